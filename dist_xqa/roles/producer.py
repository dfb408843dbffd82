"""Phase 2's producer role: a frozen teacher's logits over the distillation set D, written
to the logit store a bounded number of shards ahead of the student (logits/writer.py:
Producer, serve). roles/phase2.py builds each rank's producers with `rank_producers`.

The role plan (plan.py, `plan.producers`) puts producers on dedicated ranks, which
only produce (serve) until the student's heartbeat says it finished, or shares the
student's ranks, where each student rank runs its producers' steps while it waits for the
store (roles/student.py). Either way a producer follows the student's progress file and
stops with an error when the student's heartbeat stalls or says it failed. SKD's
time-shared producers use `teacher_compute` too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dist_xqa.config import RunConfig
from dist_xqa.data.features import TokenizerSettings
from dist_xqa.inference import label_tensors, predict_logits
from dist_xqa.layout import STUDENT, RunLayout
from dist_xqa.logits import Manifest, Producer, ShardPlan
from dist_xqa.models import load_tokenizer, load_trained
from dist_xqa.plan import RolePlan
from dist_xqa.waiting import role_heartbeats


def check_teacher_tokenizers(teacher_dirs: dict[str, Path], settings: TokenizerSettings) -> None:
    """Teachers' logits are only comparable with the student's over the same tokens: refuse
    a teacher saved with another tokenizer than the one the run's features use."""
    for teacher, directory in teacher_dirs.items():
        saved = TokenizerSettings.from_tokenizer(load_tokenizer(directory), str(directory),
                                                 settings.max_length, settings.doc_stride)
        settings.check_same(saved, "the run's features", f"teacher {teacher!r} ({directory})")


def teacher_compute(model_dir: Path, features, row_of: dict[int, int], batch_size: int, device: torch.device):
    """The producer's compute function: a frozen teacher's (start, end) logits for feature ids."""
    model = load_trained(model_dir).to(device).eval()

    def compute(feature_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [row_of[int(f)] for f in feature_ids]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            start, end = predict_logits(model, features, batch_size, device, rows)
        return torch.from_numpy(start), torch.from_numpy(end)

    return compute


def rank_producers(cfg: RunConfig, plan: RolePlan, rank: int, teacher_dirs: dict[str, Path], features,
                   row_of: dict[int, int], shard_plan: ShardPlan, manifest: Manifest, epochs: int,
                   device: torch.device) -> list[Producer]:
    """The producers rank `rank` runs: one for each teacher part the plan gives it (none on
    a student rank without producers)."""
    layout = RunLayout(cfg.run_path)
    return [
        Producer(layout.logit_store(cfg.distill.store_dir), t, shard_plan,
                 teacher_compute(teacher_dirs[t], features, row_of, cfg.eval.batch_size, device),
                 cfg.distill.lookahead_shards, epochs, manifest=manifest,
                 answer_mask=lambda ids: label_tensors(features, [row_of[f] for f in ids], torch.device("cpu"))[0],
                 stall_timeout_s=cfg.run.stall_timeout_s,
                 student_beats=lambda: role_heartbeats(cfg.run_path, STUDENT),
                 part=(p.ranks.index(rank), len(p.ranks)), stream_dir=layout.stream)
        for p in plan.producers if rank in p.ranks for t in [p.teacher]
    ]
