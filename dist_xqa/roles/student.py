"""Phase 2: producers stream the frozen teachers' logits over the distillation set D into
the sharded store; the student group trains on D with
    L = lambda1 * NLL + lambda2 * tau^2 * CE(softmax(z / tau), softmax(z_student / tau)),
z the entropy-weighted (imp) or fixed-weight (hyper) aggregate of the K teachers' logits.

One student optimizer step is one shard of the store (shard size = the student's global
batch), its features split over the student ranks. Ranks meet only through files: the
student waits on shard files as long as the missing teachers' producers beat, producers
follow the student's progress file and stop when the student's heartbeat says it
finished (or stalled, or failed). With dedicated producer ranks those ranks only produce;
with shared ranks every student rank runs its producers' steps between its own steps.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_xqa import kernels
from dist_xqa.config import RunConfig
from dist_xqa.data.features import TokenizerSettings
from dist_xqa.distributed import TrainingGroup, build_engine, release_engine
from dist_xqa.inference import model_inputs, predict_logits
from dist_xqa.logits import Manifest, Producer, ShardPlan, StoreReader, hash_checkpoint
from dist_xqa.logits.heartbeat import Heartbeat, role_heartbeat, role_heartbeats, wait_for_run_files
from dist_xqa.logits.producer import serve
from dist_xqa.logits.order import rank_rows
from dist_xqa.logits.shards import dense_logits
from dist_xqa.losses import student_loss
from dist_xqa.models import build_model, load_tokenizer, load_trained
from dist_xqa.monitor import Monitor
from dist_xqa.prepare import DISTILL_SET, Prepared
from dist_xqa.roles.finetune import label_tensors, select_and_save, write_done
from dist_xqa.roles.loop import GroupLoop, LoopState
from dist_xqa.roles.plan import RolePlan

log = logging.getLogger(__name__)
TEACHER_WAIT_POLL_S = 2.0
STUDENT_ROLE = "student"  # its heartbeats: <run>/heartbeats/student.<rank>.json
STREAM_STATS_EVERY = 10  # student steps between logit-stream statistics


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


def fixed_weights(cfg: RunConfig, teachers: list[str]) -> torch.Tensor | None:
    """hyper mode: the configured weights of the teachers in use, renormalised to sum to 1
    (so leaving a teacher out keeps the others' proportions); default 1/K."""
    if cfg.distill.aggregation != "hyper":
        return None
    # "w/ mix" teachers (mix_<lang>) take the weight of their language's slot
    raw = [cfg.distill.weights[t.removeprefix("mix_")] if cfg.distill.weights else 1.0 for t in teachers]
    total = sum(raw)
    return torch.tensor([w / total for w in raw], dtype=torch.float32)


def micro_batch_plan(rows: int, shard_rows: int, group_size: int, grad_accum: int) -> list[tuple[np.ndarray, float]]:
    """(row indices, loss multiplier) of each of the `grad_accum` micro-batches of a rank
    holding `rows` of a shard of `shard_rows` rows. DeepSpeed averages gradients over the
    group's ranks and micro-batches (1 / (group_size * grad_accum)) and a micro-batch's
    loss is the mean over its rows, so the multiplier len(micro) * group_size *
    grad_accum / shard_rows gives every row of the shard the weight 1 / shard_rows, once,
    however short the shard (1 for full shards). A micro-batch left without rows still
    runs (every rank of a ZeRO group takes the same steps) on row 0 with multiplier 0:
    zero gradient, and no row counted twice."""
    return [(part, len(part) * group_size * grad_accum / shard_rows) if len(part) else (np.arange(1), 0.0)
            for part in np.array_split(np.arange(rows), grad_accum)]


def run_phase2(cfg: RunConfig, prepared: Prepared, ds_config: dict, plan: RolePlan,
               groups: dict[str, TrainingGroup], device: torch.device) -> None:
    out_dir = cfg.run_path / "student"
    if (out_dir / "DONE.json").exists():
        return
    rank = dist.get_rank()
    teachers = list(plan.teachers)
    teacher_dirs = {t: cfg.run_path / "teachers" / t for t in teachers}
    # Phase 1 and 2 meet through files: every teacher must be saved.
    wait_for_run_files(cfg.run_path, [d / "DONE.json" for d in teacher_dirs.values()], cfg.run.stall_timeout_s,
                       "phase 2 waiting for the teachers", roles="teacher_*",
                       expected=[f"teacher_{t}" for t in teachers], poll_s=TEACHER_WAIT_POLL_S)
    check_teacher_tokenizers(teacher_dirs, prepared.settings)

    scfg = cfg.student
    features = prepared.features(DISTILL_SET)
    feature_ids = [int(f) for f in features["feature_id"]]
    row_of = {f: i for i, f in enumerate(feature_ids)}
    shard_plan = ShardPlan(feature_ids, scfg.micro_batch_size * scfg.grad_accum * plan.student.size, cfg.seed)
    manifest = Manifest.for_plan(shard_plan, prepared.settings.fingerprint(),
                                 {t: hash_checkpoint(d) for t, d in teacher_dirs.items()},
                                 dtype=cfg.distill.logits_dtype, topk=cfg.distill.store_topk)
    store = cfg.run_path / "logits"
    producers = [
        Producer(store, t, shard_plan,
                 teacher_compute(teacher_dirs[t], features, row_of, cfg.eval.batch_size, device),
                 cfg.distill.lookahead_shards, scfg.epochs, manifest=manifest,
                 answer_mask=lambda ids: label_tensors(features, [row_of[f] for f in ids], torch.device("cpu"))[0],
                 stall_timeout_s=cfg.run.stall_timeout_s,
                 student_beats=lambda: role_heartbeats(cfg.run_path, STUDENT_ROLE),
                 part=(p.ranks.index(rank), len(p.ranks)))
        for p in plan.producers if rank in p.ranks for t in [p.teacher]
    ]
    if rank in plan.student.ranks:
        train_student(cfg, prepared, ds_config, groups[plan.student.name], device, features, row_of,
                      shard_plan, manifest, teachers, producers)
    else:  # a dedicated producer rank: until the student's heartbeat says it finished
        serve(producers)


def train_student(cfg: RunConfig, prepared: Prepared, ds_config: dict, group: TrainingGroup,
                  device: torch.device, features, row_of: dict[int, int], shard_plan: ShardPlan,
                  manifest: Manifest, teachers: list[str], producers: list[Producer]) -> None:
    scfg, kd = cfg.student, cfg.distill
    out_dir = cfg.run_path / "student"
    tokenizer = prepared.tokenizer()
    dev_features, dev_examples = prepared.features(f"{DISTILL_SET}.dev"), prepared.examples(f"{DISTILL_SET}.dev")
    context_lang = np.asarray(features["context_lang"])
    weights = fixed_weights(cfg, teachers)
    engine = build_engine(build_model(cfg.model, tokenizer, seed=cfg.seed + 1), ds_config, group,
                          lr=scfg.lr, weight_decay=scfg.weight_decay, micro_batch_size=scfg.micro_batch_size,
                          gradient_accumulation_steps=scfg.grad_accum, total_steps=len(shard_plan) * scfg.epochs,
                          warmup_ratio=scfg.warmup_ratio)
    monitor = Monitor(cfg.run_path, "student", enabled=group.rank == 0)
    heartbeat = Heartbeat(role_heartbeat(cfg.run_path, STUDENT_ROLE, group.rank), STUDENT_ROLE)
    reader = StoreReader(cfg.run_path / "logits", teachers, shard_plan, manifest, cfg.run.stall_timeout_s,
                         kd.store_mode, int(kd.disk_budget_gb * 2**30) if kd.store_mode == "cache" else None,
                         lookahead=kd.lookahead_shards, writer=group.rank == 0, heartbeat=heartbeat)

    def produce_once() -> bool:  # time-shared producers: one shard of work, if any is allowed
        return any(p.step() for p in producers)

    def train_step(epoch: int, position: int, state: LoopState) -> None:
        shard = reader.get(epoch, position, while_waiting=produce_once if producers else None)
        part = rank_rows(len(shard.feature_ids), group.rank, group.size)
        ids = [int(f) for f in shard.feature_ids[part]]
        t_start, t_end = shard.start[:, part], shard.end[:, part]
        micro_batches = micro_batch_plan(len(ids), len(shard.feature_ids), group.size, scfg.grad_accum)
        if not ids:  # a rank without rows of a short last shard steps on a borrowed row, weighted 0
            ids, t_start, t_end = [int(shard.feature_ids[0])], shard.start[:, :1], shard.end[:, :1]
        rows = [row_of[f] for f in ids]
        logs: dict[str, list[float]] = defaultdict(list)
        for micro, weight in micro_batches:
            micro_rows = [rows[i] for i in micro]
            out = engine(**model_inputs(features, micro_rows, device))
            mask, start_pos, end_pos = label_tensors(features, micro_rows, device)
            loss = student_loss(
                out.start_logits.float(), out.end_logits.float(),
                dense_logits(t_start[:, micro], mask), dense_logits(t_end[:, micro], mask),
                mask, start_pos, end_pos, lambda1=kd.lambda_nll, lambda2=kd.lambda_kd, tau=kd.tau,
                mode=kd.aggregation, fixed_weights=weights, sign=kd.imp_sign, kd_fn=kernels.entropy_weighted_kd)
            engine.backward(loss.total * weight)
            engine.step()
            if weight == 0:  # a borrowed row: no part of the student's loss
                continue
            logs["student/nll"].append(loss.nll.item())
            logs["student/kd"].append(loss.kd.item())
            langs = np.concatenate([context_lang[micro_rows]] * 2)  # start rows, then end rows
            kd_rows = loss.kd_rows.cpu().numpy()
            for lang in np.unique(langs):  # KD by branch = by passage language
                logs[f"student/kd_by_branch/{lang}"].append(float(kd_rows[langs == lang].mean()))
            if kd.aggregation == "imp":
                for k, t in enumerate(teachers):
                    logs[f"student/teacher_weight/{t}"].append(loss.weights[:, k].mean().item())
        monitor.scalars({tag: float(np.mean(v)) for tag, v in logs.items()}, state.global_step)
        monitor.scalar("student/lr", engine.get_lr()[0], state.global_step)
        if state.global_step % STREAM_STATS_EVERY == 0:  # lists the store: not on every step
            stats = reader.stats()
            monitor.scalars({"stream/lookahead_shards": stats.lookahead_shards,
                             "stream/wait_seconds": stats.wait_seconds,
                             "stream/bytes_on_disk": stats.bytes_on_disk}, state.global_step)
        monitor.throughput(len(shard.feature_ids), state.global_step)

    def end_of_epoch(epoch: int, state: LoopState) -> None:
        select_and_save(engine, tokenizer, dev_features, dev_examples, out_dir, cfg, group, state, epoch,
                        monitor, "student", device)

    loop = GroupLoop(engine, group, cfg.run_path / "checkpoints" / "student", cfg.checkpoint,
                     desc="student", show_progress=group.rank == 0, heartbeat=heartbeat)
    if group.rank == 0:
        # Shards behind a checkpoint are never read again by a resumed student: free them.
        loop.on_checkpoint = lambda state: reader.commit_progress(state.epoch, state.step_in_epoch)
    state = loop.run(scfg.epochs, lambda epoch: len(shard_plan), train_step, end_of_epoch)
    if group.rank == 0:
        write_done(out_dir, cfg, state, scfg.epochs, len(dev_features))
    # Time-shared producers have no work left: every student rank has read the last shard
    # (the ranks step together), and the producers of other ranks stop on the student's
    # finished heartbeat, beaten by loop.run.
    dist.barrier(group=group.process_group)
    monitor.close()
    release_engine(engine)
