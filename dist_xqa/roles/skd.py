"""Phase 2 of strategy skd: self-knowledge distillation with mAP@k (Carrino et al. 2023).

Phase 1 (optional) is an ordinary fine-tuning job on the source language (`PHASE1_JOB`,
trained by roles.supervised with the teacher.* section). Phase 2 trains the student on a
cross-lingual sample of every question x passage pair (`TRAIN_SET`'s features), drawn anew
each epoch with the epoch's seed, against the teacher of the epoch's generation:

- Generation e's teacher is the student's weights at the start of epoch e, saved once in
  Hugging Face format under <run>/skd/teacher_gen<e>. A resumed student loads it instead
  of taking its own (moved) weights, so every step of epoch e sees one teacher. A
  checkpoint in epoch e (the one at the end of epoch e - 1 included) is all a resume can
  start from, so it removes the snapshots of earlier generations: one is kept at a time,
  and none once the student has finished.
- Its logits go through the logit store like LBMRC's teachers' (teacher name "self"), with
  a shard plan over epoch e's sample and a manifest carrying `generation = e` and the
  snapshot's hash. Producers are time-shared on the student ranks, each writing its part
  of the shards while its reader waits; a producer of generation e only has epoch e's plan,
  so it can never run ahead across the epoch boundary, and the store of generation e - 1
  is wiped when generation e starts (the reader refuses a store of another generation:
  StoreMismatchError).
- Loss: strategies.skd.skd_loss with alpha_kl fixed or the teacher's mAP@k on the batch;
  logged as student/loss/<part> and student/alpha_kl every `Monitor.every` steps (the values stay
  on the device in between: no host sync per step).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from dist_xqa.config import RunConfig, SkdConfig, batch_for_group
from dist_xqa.data.builders import cross_lingual_sampling
from dist_xqa.data.parallel import ParallelSet, align
from dist_xqa.data.records import QAExample
from dist_xqa.distributed import TrainingGroup, build_engine, release_engine
from dist_xqa.inference import label_tensors, model_inputs
from dist_xqa.jobs import SKD_PHASE1_JOB, STUDENT_SETS, dev_set, job_dir, phase1_jobs
from dist_xqa.layout import STUDENT, RunLayout
from dist_xqa.logits import Manifest, Producer, ShardPlan, StoreReader, hash_checkpoint
from dist_xqa.logits.order import rank_rows
from dist_xqa.logits.shards import dense_logits
from dist_xqa.models import build_model, load_trained, save_hf
from dist_xqa.monitor import DeviceScalars, Monitor
from dist_xqa.prepared import Prepared
from dist_xqa.roles.loop import GroupLoop, LoopState, full_state_dict
from dist_xqa.plan import RolePlan
from dist_xqa.roles.producer import teacher_compute
from dist_xqa.roles.selection import select_and_save, write_done
from dist_xqa.roles.student import micro_batch_plan
from dist_xqa.strategies.skd import map_at_k, skd_loss
from dist_xqa.waiting import wait_for_run_files

log = logging.getLogger(__name__)
PHASE1_JOB = SKD_PHASE1_JOB
TRAIN_SET = STUDENT_SETS["skd"]  # every question x passage pair: each epoch's sample is a subset of its features
DEV_SET = dev_set(TRAIN_SET)
TEACHER = "self"
Key = tuple[str, str, str]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s cross-lingual sample: distinct for every (seed, epoch)."""
    return int.from_bytes(hashlib.sha256(f"dist_xqa.skd:{seed}:{epoch}".encode()).digest()[:8], "big")


def source_parallel_set(examples: Sequence[QAExample], languages: Sequence[str]) -> ParallelSet:
    """The parallel set behind a set of question x passage pairs: its same-language examples
    aligned by id, in `languages` order."""
    per_lang: dict[str, list[QAExample]] = {lang: [] for lang in languages}
    for ex in examples:
        if ex.question_lang == ex.context_lang and ex.context_lang in per_lang:
            per_lang[ex.context_lang].append(ex)
    return align(per_lang)


def feature_keys(features) -> list[Key]:
    """The (id, question language, passage language) of every feature row."""
    cols = features.select_columns(["example_id", "question_lang", "context_lang"])[:]
    return list(zip(cols["example_id"], cols["question_lang"], cols["context_lang"]))


def epoch_rows(keys: Sequence[Key], ps: ParallelSet, n: int | None, seed: int, epoch: int,
               source_lang: str) -> list[int]:
    """Feature rows of epoch `epoch`'s cross-lingual sample (every window of each sampled
    example). n = None: every target language."""
    n = len(ps.languages) - 1 if n is None else n
    sampled = {ex.key for ex in cross_lingual_sampling(ps, n, epoch_seed(seed, epoch), source_lang)}
    return [row for row, key in enumerate(keys) if key in sampled]


def kl_coefficient(skd: SkdConfig, teacher_start: torch.Tensor, teacher_end: torch.Tensor, mask: torch.Tensor,
                   start_pos: torch.Tensor, end_pos: torch.Tensor) -> torch.Tensor | float:
    """alpha_kl for one micro-batch: the fixed value, 0 (no teacher), or the teacher's mAP@k
    (map, the paper) / MRR@k (mrr, the public code), on the device."""
    if skd.coefficient == "fixed":
        return skd.alpha_kl
    if skd.coefficient == "none":
        return 0.0
    return map_at_k(teacher_start, teacher_end, mask, start_pos, end_pos, k=skd.map_k, delta=skd.map_delta,
                    variant=skd.coefficient, reduction=skd.map_reduction)


def teacher_dir(cfg: RunConfig, generation: int) -> Path:
    return RunLayout(cfg.run_path).skd_teacher(generation)


def remove_earlier_teachers(cfg: RunConfig, generation: int) -> list[Path]:
    """Removes the snapshots of the generations before `generation` (no resume reads them
    once a checkpoint of epoch `generation` exists); returns what it removed."""
    removed = [teacher_dir(cfg, g) for g in range(generation) if teacher_dir(cfg, g).exists()]
    for directory in removed:
        shutil.rmtree(directory)
    return removed


def rank_micro_batches(shard_rows: int, group_rank: int, group_size: int,
                       grad_accum: int) -> list[tuple[list[int], float]]:
    """(positions in the shard, loss multiplier) of each of this rank's `grad_accum`
    micro-batches: its part of the shard (rank_rows) split as the LBMRC student splits
    it (roles.student.micro_batch_plan), so every row of a short shard weighs
    1 / shard_rows once and a micro-batch left without rows steps on a borrowed row
    with multiplier 0."""
    mine = list(range(shard_rows))[rank_rows(shard_rows, group_rank, group_size)]
    return [([mine[i] for i in index] if mine else [0], weight)
            for index, weight in micro_batch_plan(len(mine), shard_rows, group_size, grad_accum)]


def snapshot_teacher(engine, tokenizer, directory: Path, group: TrainingGroup) -> None:
    """Saves the student's current weights as a generation's teacher, unless an earlier run
    saved it (then the student resumed inside that generation and must keep its teacher).
    Every rank of the group calls this: the ZeRO-3 gather is collective, so every rank
    decides from the same file state (checked before the barrier, written after it)."""
    exists = (directory / "config.json").exists()
    dist.barrier(group=group.process_group)
    if not exists:
        weights = full_state_dict(engine)
        if group.rank == 0:
            save_hf(engine.module, tokenizer, directory, state_dict=weights)
    dist.barrier(group=group.process_group)


def initial_model(cfg: RunConfig, tokenizer) -> torch.nn.Module:
    """Where phase 2 starts: the phase-1 model, `init_from`, or a fresh model.name."""
    skd = cfg.strategy.skd
    if skd.phase1:
        phase1 = job_dir(cfg, next(job for job in phase1_jobs(cfg) if job.name == PHASE1_JOB))
        wait_for_run_files(cfg.run_path, [RunLayout.done(phase1)], cfg.run.stall_timeout_s,
                           "self-distillation waiting for its phase-1 model", expected=[RunLayout.model_name(phase1)])
        return load_trained(phase1)
    if skd.init_from:
        return load_trained(skd.init_from)
    return build_model(cfg.model, tokenizer, seed=cfg.seed + 1)


class Generation:
    """Epoch e of phase 2: its sample's shard plan and, with a teacher, its store reader and
    this rank's time-shared producer."""

    def __init__(self, epoch: int, plan: ShardPlan, reader: StoreReader | None, producer: Producer | None):
        self.epoch, self.plan, self.reader, self.producer = epoch, plan, reader, producer

    def produce_once(self) -> bool:
        # `finished` is only a hint (a stale progress file can set it): step regardless
        return self.producer is not None and self.producer.step()

    def rows(self, position: int, row_of: dict[int, int]) -> tuple[list[int], object, object]:
        """(feature rows, teacher start, teacher end) of the batch at `position`; the teacher's
        logits as the store gives them ([1, S, L], dense or top-k), None without a teacher."""
        if self.reader is None:
            ids = self.plan.features(self.plan.order(0)[position])
            return [row_of[f] for f in ids], None, None
        shard = self.reader.get(0, position, while_waiting=self.produce_once)
        return [row_of[int(f)] for f in shard.feature_ids], shard.start, shard.end


def run_skd(cfg: RunConfig, prepared: Prepared, ds_config: dict, plan: RolePlan,
            groups: dict[str, TrainingGroup], device: torch.device) -> None:
    """Phase 2 of strategy skd on the student group, which must span every rank (the
    producers share the student ranks: build the plan with student_min_ranks=world size)."""
    layout = RunLayout(cfg.run_path)
    out_dir = layout.student
    if layout.done(out_dir).exists():
        return
    if dist.get_rank() not in plan.student.ranks:
        raise ValueError("strategy skd runs its teacher producers on the student ranks: the role plan's student "
                         "group must span every rank (plan_roles(..., student_min_ranks=world_size))")
    group = groups[plan.student.name]
    scfg, skd, kd = batch_for_group(cfg.student, group.size), cfg.strategy.skd, cfg.distill
    tokenizer = prepared.tokenizer()
    features = prepared.features(TRAIN_SET)
    dev_features, dev_examples = prepared.features(DEV_SET), prepared.examples(DEV_SET)
    feature_ids = [int(f) for f in features["feature_id"]]
    row_of = {f: i for i, f in enumerate(feature_ids)}
    keys = feature_keys(features)
    source_lang = cfg.data.source_lang
    ps = source_parallel_set(prepared.examples(TRAIN_SET), cfg.train_languages)
    shard_size = scfg.micro_batch_size * scfg.grad_accum * group.size
    store = layout.store
    distil = skd.coefficient != "none"

    def epoch_plan(epoch: int) -> ShardPlan:
        rows = epoch_rows(keys, ps, skd.sampled_languages, cfg.seed, epoch, source_lang)
        return ShardPlan([feature_ids[r] for r in rows], shard_size, epoch_seed(cfg.seed, epoch) % 2**31)

    engine = build_engine(initial_model(cfg, tokenizer), ds_config, group, lr=scfg.lr,
                          weight_decay=scfg.weight_decay, micro_batch_size=scfg.micro_batch_size,
                          gradient_accumulation_steps=scfg.grad_accum,
                          total_steps=len(epoch_plan(0)) * scfg.epochs, warmup_ratio=scfg.warmup_ratio)
    monitor = Monitor(cfg.run_path, STUDENT, enabled=group.rank == 0, every=cfg.monitor.every)
    current: list[Generation] = []

    def generation(epoch: int) -> Generation:
        if current and current[0].epoch == epoch:
            return current[0]
        shard_plan, reader, producer = epoch_plan(epoch), None, None
        if distil:
            directory = teacher_dir(cfg, epoch)
            snapshot_teacher(engine, tokenizer, directory, group)
            manifest = Manifest.for_plan(shard_plan, prepared.settings.fingerprint(),
                                         {TEACHER: hash_checkpoint(directory)}, dtype=kd.logits_dtype,
                                         generation=epoch, topk=kd.store_topk)
            # reset: the previous generation's store is stale once this one starts
            producer = Producer(store, TEACHER, shard_plan,
                                teacher_compute(directory, features, row_of, cfg.eval.batch_size, device),
                                kd.lookahead_shards, 1, manifest=manifest, reset=True,
                                part=(group.rank, group.size),
                                answer_mask=lambda ids: label_tensors(features, [row_of[f] for f in ids],
                                                                      torch.device("cpu"))[0])
            dist.barrier(group=group.process_group)  # every rank's producer has checked the store
            # window mode whatever distill.store_mode says: a generation's shards are read in
            # one epoch only, so there is nothing to cache
            reader = StoreReader(store, [TEACHER], shard_plan, manifest, cfg.run.stall_timeout_s, "window",
                                 lookahead=kd.lookahead_shards, writer=group.rank == 0)
        if group.rank == 0:
            log.info("skd: epoch %d, teacher generation %d: %d features of the cross-lingual sample in %d batches",
                     epoch + 1, epoch, len(shard_plan.feature_ids), len(shard_plan))
        current[:] = [Generation(epoch, shard_plan, reader, producer)]
        return current[0]

    scalars = DeviceScalars(monitor)  # read once per flush, not per step

    def train_step(epoch: int, position: int, state: LoopState) -> None:
        gen = generation(epoch)
        rows, t_start, t_end = gen.rows(position, row_of)
        # Every rank steps every micro-batch (ZeRO's collectives need them all), on a
        # borrowed row at multiplier 0 where a short last batch leaves it none.
        for micro, weight in rank_micro_batches(len(rows), group.rank, group.size, scfg.grad_accum):
            micro_rows = [rows[i] for i in micro]
            out = engine(**model_inputs(features, micro_rows, device))
            mask, start_pos, end_pos = label_tensors(features, micro_rows, device)
            student_start, student_end = out.start_logits.float(), out.end_logits.float()
            if t_start is None:  # no teacher: the "w/ ce" row
                teacher_start, teacher_end = student_start.detach(), student_end.detach()
            else:
                teacher_start = dense_logits(t_start[:, micro], mask)[0]
                teacher_end = dense_logits(t_end[:, micro], mask)[0]
            alpha = kl_coefficient(skd, teacher_start, teacher_end, mask, start_pos, end_pos)
            loss = skd_loss(student_start, student_end, teacher_start, teacher_end, mask, start_pos, end_pos,
                            alpha_ce=skd.alpha_ce, alpha_kl=alpha, tau=skd.temperature,
                            tau_squared=skd.tau_squared, start_end=skd.kl_start_end)
            engine.backward(loss.total * weight)
            engine.step()
            if weight:  # a borrowed row is no part of the student's loss
                for name in ("total", "ce", "kl"):
                    scalars.add(f"student/loss/{name}", getattr(loss, name))
                scalars.add("student/alpha_kl", loss.alpha_kl)
        if scalars.due(state.global_step):
            scalars.flush(state.global_step)
            monitor.scalar("student/lr", engine.get_lr()[0], state.global_step)
        monitor.throughput(len(rows), state.global_step)

    def end_of_epoch(epoch: int, state: LoopState) -> None:
        scalars.flush(state.global_step)
        select_and_save(engine, tokenizer, dev_features, dev_examples, out_dir, cfg, group, state, epoch,
                        monitor, STUDENT, device)

    def commit(state: LoopState) -> None:
        # Shards behind a mid-epoch checkpoint are never read again by a resumed student,
        # nor the teachers of the generations before this checkpoint's epoch.
        if current and current[0].reader is not None and state.epoch == current[0].epoch:
            current[0].reader.commit_progress(0, state.step_in_epoch)
        if removed := remove_earlier_teachers(cfg, state.epoch):
            log.info("skd: removed the teacher snapshots no resume reads: %s", ", ".join(p.name for p in removed))

    loop = GroupLoop(engine, group, layout.checkpoints(STUDENT), cfg.checkpoint,
                     desc="student (skd)", show_progress=group.rank == 0)
    if group.rank == 0:
        loop.on_checkpoint = commit
    state = loop.run(scfg.epochs, lambda epoch: len(epoch_plan(epoch)), train_step, end_of_epoch)
    if group.rank == 0:
        write_done(out_dir, cfg, state, scfg.epochs, len(dev_features))
    dist.barrier(group=group.process_group)
    monitor.close()
    release_engine(engine)
