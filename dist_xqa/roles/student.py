"""Phase 2's student (LBMRC): trains on the distillation set D with
    L = lambda1 * NLL + lambda2 * tau^2 * CE(softmax(z / tau), softmax(z_student / tau)),
z the entropy-weighted (imp) or fixed-weight (hyper) aggregate of the K teachers' logits,
read from the sharded store that the producers fill (roles/producer.py; roles/phase2.py
starts both).

One student optimizer step is one shard of the store (shard size = the student's global
batch), its features split over the student ranks. The student waits on shard files as
long as the missing teachers' producers beat; its own heartbeat tells the producers where
it is and when it has finished. With shared ranks every student rank runs its producers'
steps while it waits for the store.

A student step never waits on the host: its micro-batches come from a DataLoader over
the prepared features and its teachers' logits from the store, both prepared and moved
to the device a few steps ahead on a side thread (StudentInputs, logits.reader.ReadAhead),
and its losses stay on the device until the monitor reads them every `monitor.every`
steps (DeviceScalars). The debug trace (`run.trace_steps`, roles/trace.py) is the
exception: it reads each step's losses back after the step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from dist_xqa import kernels
from dist_xqa.config import DistillConfig, RunConfig, batch_for_group
from dist_xqa.distributed import TrainingGroup, build_engine, release_engine
from dist_xqa.inference import LABELS, input_columns
from dist_xqa.jobs import DISTILL_SET, dev_set
from dist_xqa.layout import STUDENT, RunLayout
from dist_xqa.logits import Manifest, Producer, ShardPlan, StoreReader
from dist_xqa.logits.order import rank_rows
from dist_xqa.logits.reader import ReadAhead, logits_to
from dist_xqa.logits.shards import Logits, dense_logits
from dist_xqa.losses import student_loss
from dist_xqa.models import build_model
from dist_xqa.monitor import DeviceScalars, Monitor
from dist_xqa.prepared import Prepared
from dist_xqa.roles.loop import GroupLoop, LoopState
from dist_xqa.roles.selection import select_and_save, write_done
from dist_xqa.roles.trace import StepTrace, trace_path
from dist_xqa.waiting import WAITING, Heartbeat, role_heartbeat

log = logging.getLogger(__name__)
STREAM_STATS_EVERY = 10  # student steps between logit-stream statistics
READ_AHEAD_STEPS = 2  # steps whose inputs the side thread prepares ahead of the student


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


class MicroBatch(NamedTuple):
    """One micro-batch of a student step: CPU tensors from the DataLoader (ShardBatches),
    then on the device with its teachers' logits (StudentInputs)."""

    inputs: dict[str, torch.Tensor]  # model inputs [B, L]
    mask: torch.Tensor  # positions mask [B, L], bool
    start: torch.Tensor  # span labels [B]
    end: torch.Tensor
    langs: torch.Tensor  # passage-language codes [B] (the KD loss by branch)
    shard_rows: torch.Tensor  # which rows of the shard these are (to cut the teachers' logits)
    weight: float  # loss multiplier (micro_batch_plan); 0: a borrowed row, not logged
    feature_ids: torch.Tensor  # the rows' feature ids [B], kept on the host (the step trace)
    teacher_start: Logits | None = None  # [K, B, L]
    teacher_end: Logits | None = None


class StepBatch(NamedTuple):
    position: int  # in the epoch's order
    rows: int  # the shard's rows, over every rank
    micro: list[MicroBatch]


class ShardBatches(torch.utils.data.Dataset):
    """Item `position`: this rank's part of the shard at `position` of `epoch`'s order of
    `plan`, as its `grad_accum` micro-batches (micro_batch_plan), read from the prepared
    features; a rank without rows of a short last shard steps on the shard's first row,
    weighted 0. `languages`: the passage languages, sorted; a row's code is its index."""

    def __init__(self, features, plan: ShardPlan, epoch: int, rank: int, size: int, grad_accum: int,
                 languages: list[str]):
        self.inputs = input_columns(features)
        self.columns = features.select_columns([*self.inputs, *LABELS, "feature_id"]).with_format("numpy")
        ids = np.asarray(features["feature_id"], dtype=np.int64)
        self.sorted_ids, self.row_order = np.sort(ids), np.argsort(ids)  # feature id -> row, vectorised
        self.langs = np.searchsorted(np.asarray(languages), np.asarray(features["context_lang"]))
        self.plan, self.epoch, self.rank, self.size, self.grad_accum = plan, epoch, rank, size, grad_accum

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, position: int) -> StepBatch:
        ids = np.asarray(self.plan.features(self.plan.shard_at(self.plan.global_index(self.epoch, position))))
        mine = np.arange(len(ids))[rank_rows(len(ids), self.rank, self.size)]
        plan = micro_batch_plan(len(mine), len(ids), self.size, self.grad_accum)
        if not len(mine):
            mine = np.arange(1)
        micro = []
        for index, weight in plan:
            shard_rows = mine[index]
            rows = self.row_order[np.searchsorted(self.sorted_ids, ids[shard_rows])]
            cols = self.columns[rows]
            micro.append(MicroBatch({k: torch.as_tensor(cols[k], dtype=torch.long) for k in self.inputs},
                                    torch.as_tensor(cols["answer_mask"]).bool(),
                                    torch.as_tensor(cols["start_positions"], dtype=torch.long),
                                    torch.as_tensor(cols["end_positions"], dtype=torch.long),
                                    torch.as_tensor(self.langs[rows]), torch.as_tensor(shard_rows), weight,
                                    torch.as_tensor(cols["feature_id"])))
        return StepBatch(position, len(ids), micro)


def loader_workers(device: torch.device, setting: int | str = "auto") -> int:
    """DataLoader worker processes (`run.loader_workers`): a number as given; auto: on a
    GPU host 2 assemble batches beside the training process, on a CPU run none (the
    read-ahead thread does it, and workers would only take cores from the ranks)."""
    if setting != "auto":
        return int(setting)
    return 2 if device.type == "cuda" else 0


class StudentInputs:
    """The student's step inputs in order, prepared READ_AHEAD_STEPS ahead on a side
    thread (ReadAhead): the rank's micro-batches (`batches(epoch)`: a ShardBatches, read
    through a DataLoader, pinned on a GPU) and the K teachers' logits of the same rows
    from `reader`, all moved to `device`. `get` is asked for the steps in order; a
    position out of order (the first step, a new epoch, a resume) starts a new read-ahead
    there. `close()` stops the thread (also when the student fails). `wait_seconds`: the
    time the student has waited in `get` (the thread's own waits for the store overlap
    the student's steps and are not counted)."""

    def __init__(self, batches: Callable[[int], ShardBatches], reader: StoreReader, device: torch.device,
                 workers: int, depth: int = READ_AHEAD_STEPS):
        self.batches, self.reader, self.device, self.workers, self.depth = batches, reader, device, workers, depth
        self._ahead: ReadAhead[StepBatch] | None = None
        self._next: tuple[int, int] | None = None
        self.wait_seconds = 0.0

    def _read(self, epoch: int, start: int, idle: Callable[[], bool]) -> Iterator[StepBatch]:
        dataset = self.batches(epoch)
        cuda = self.device.type == "cuda"
        # Its own generator: a DataLoader draws a seed from it on every start, and the global
        # one is the student's (dropout), restored from checkpoints on resume (GroupLoop).
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)),
                                             num_workers=self.workers, pin_memory=cuda,
                                             generator=torch.Generator())

        def to_device(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=cuda)

        for batch in loader:
            shard = self.reader.get(epoch, batch.position, while_waiting=idle)
            yield batch._replace(micro=[m._replace(
                inputs={k: to_device(v) for k, v in m.inputs.items()}, mask=to_device(m.mask),
                start=to_device(m.start), end=to_device(m.end), langs=to_device(m.langs),
                teacher_start=logits_to(shard.start[:, m.shard_rows], self.device),
                teacher_end=logits_to(shard.end[:, m.shard_rows], self.device)) for m in batch.micro])

    def get(self, epoch: int, position: int, while_waiting: Callable[[], bool] | None = None) -> StepBatch:
        """The inputs of step `position` of `epoch`; `while_waiting` as in ReadAhead.next."""
        if self._next != (epoch, position):
            self.close()
            self._ahead = ReadAhead(lambda idle: self._read(epoch, position, idle), self.depth,
                                    name=f"student read-ahead (epoch {epoch + 1})")
        began = time.monotonic()
        batch = self._ahead.next(while_waiting)
        self.wait_seconds += time.monotonic() - began
        self._next = (epoch, position + 1)
        return batch

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        self._ahead, self._next = None, None


class StudentScalars:
    """The student's per-step scalars, kept on the device (DeviceScalars) and written every
    `monitor.every` steps: NLL, KD, KD by branch (passage language) and, for imp, each
    teacher's mean weight."""

    def __init__(self, monitor: Monitor, languages: list[str], teachers: list[str], imp: bool):
        self.scalars = DeviceScalars(monitor)
        self.branches = tuple(f"student/kd_by_branch/{lang}" for lang in languages)
        self.teachers = tuple(f"student/teacher_weight/{t}" for t in teachers) if imp else ()

    def add(self, loss, langs: torch.Tensor) -> None:
        self.scalars.add("student/nll", loss.nll)
        self.scalars.add("student/kd", loss.kd)
        codes = torch.cat([langs, langs])  # kd_rows: start rows, then end rows
        rows = loss.kd_rows.detach().float()
        # index_add, not bincount: bincount sizes its output from the data (a host sync)
        sums = torch.zeros(len(self.branches), device=rows.device).index_add_(0, codes, rows)
        counts = torch.zeros_like(sums).index_add_(0, codes, torch.ones_like(rows))
        self.scalars.add_each(self.branches, sums / counts.clamp(min=1), counts > 0)
        if self.teachers:
            self.scalars.add_each(self.teachers, loss.weights.detach().float().mean(0))


def kd_options(kd: DistillConfig, weights: torch.Tensor | None) -> dict:
    """student_loss's keyword arguments for the run's distillation settings."""
    return dict(lambda1=kd.lambda_nll, lambda2=kd.lambda_kd, tau=kd.tau, mode=kd.aggregation,
                fixed_weights=weights, sign=kd.imp_sign, kd_fn=kernels.entropy_weighted_kd)


def student_step(engine, batch: StepBatch, options: dict, scalars: StudentScalars | None) -> list[torch.Tensor]:
    """One optimizer step of the student on `batch` (StudentInputs.get): its micro-batches'
    forward, loss (student_loss with `options`, kd_options) and backward, then the step.
    Returns each micro-batch's total loss, on the device. Nothing here reads a value back
    to the host."""
    losses = []
    for micro in batch.micro:
        out = engine(**micro.inputs)
        loss = student_loss(out.start_logits.float(), out.end_logits.float(),
                            dense_logits(micro.teacher_start, micro.mask), dense_logits(micro.teacher_end, micro.mask),
                            micro.mask, micro.start, micro.end, **options)
        engine.backward(loss.total * micro.weight)
        engine.step()
        if scalars is not None and micro.weight != 0:  # a borrowed row: no part of the student's loss
            scalars.add(loss, micro.langs)
        losses.append(loss.total.detach())
    return losses


class StudentTrainStep:
    """GroupLoop's train_step for the student: waits for the step's inputs (beating the
    student's heartbeat and running time-shared producers meanwhile), runs student_step,
    and writes the scalars every `monitor.every` steps and the stream statistics every
    STREAM_STATS_EVERY steps; with a `trace` (run.trace_steps), each step to it."""

    def __init__(self, engine, inputs: StudentInputs, options: dict, scalars: StudentScalars, monitor: Monitor,
                 reader: StoreReader, heartbeat: Heartbeat, producers: list[Producer], trace: StepTrace | None = None):
        self.engine, self.inputs, self.options, self.scalars = engine, inputs, options, scalars
        self.monitor, self.reader, self.heartbeat, self.producers = monitor, reader, heartbeat, producers
        self.trace = trace

    def __call__(self, epoch: int, position: int, state: LoopState) -> None:
        def waiting() -> bool:  # while the read-ahead waits for the store
            self.heartbeat.beat(state=WAITING, epoch=epoch, position=position)
            return any(p.step() for p in self.producers)  # time-shared producers: one shard, if any

        batch = self.inputs.get(epoch, position, while_waiting=waiting)
        losses = student_step(self.engine, batch, self.options, self.scalars)
        if self.trace is not None:
            self.trace.record(state.global_step, epoch, position, batch.micro, losses)
        if self.scalars.scalars.due(state.global_step):
            self.flush(state.global_step)
        if state.global_step % STREAM_STATS_EVERY == 0:  # lists the store: not on every step
            stats = self.reader.stats()
            self.monitor.scalars({"stream/lookahead_shards": stats.lookahead_shards,
                                  "stream/wait_seconds": self.inputs.wait_seconds,
                                  "stream/bytes_on_disk": stats.bytes_on_disk}, state.global_step)
        self.monitor.throughput(batch.rows, state.global_step)

    def flush(self, step: int) -> None:
        self.scalars.scalars.flush(step)
        self.monitor.scalar("student/lr", self.engine.get_lr()[0], step)


def train_student(cfg: RunConfig, prepared: Prepared, ds_config: dict, group: TrainingGroup,
                  device: torch.device, features, shard_plan: ShardPlan,
                  manifest: Manifest, teachers: list[str], producers: list[Producer]) -> None:
    scfg, kd = batch_for_group(cfg.student, group.size), cfg.distill
    layout = RunLayout(cfg.run_path)
    out_dir = layout.student
    tokenizer = prepared.tokenizer()
    dev_features, dev_examples = prepared.features(dev_set(DISTILL_SET)), prepared.examples(dev_set(DISTILL_SET))
    languages = sorted(set(features["context_lang"]))
    options = kd_options(kd, fixed_weights(cfg, teachers))
    engine = build_engine(build_model(cfg.model, tokenizer, seed=cfg.seed + 1), ds_config, group,
                          lr=scfg.lr, weight_decay=scfg.weight_decay, micro_batch_size=scfg.micro_batch_size,
                          gradient_accumulation_steps=scfg.grad_accum, total_steps=len(shard_plan) * scfg.epochs,
                          warmup_ratio=scfg.warmup_ratio)
    monitor = Monitor(cfg.run_path, STUDENT, enabled=group.rank == 0, every=cfg.monitor.every)
    scalars = StudentScalars(monitor, languages, teachers, imp=kd.aggregation == "imp")
    heartbeat = Heartbeat(role_heartbeat(cfg.run_path, STUDENT, group.rank), STUDENT)
    # The reader runs on the read-ahead thread: it beats no heartbeat (the main thread
    # does while it waits for the thread, below).
    # A precomputed store keeps every shard to the end (its budget was checked at start-up,
    # disk.check_precompute_budget): the reader evicts none of them.
    # A shared store (distill.store_dir) is the sweep's: no student evicts from it (disk.py counts it once, whole).
    budget = (int(kd.disk_budget_gb * 2**30) if kd.store_mode == "cache" and not kd.precompute and not kd.store_dir
              else None)
    reader = StoreReader(layout.logit_store(kd.store_dir), teachers, shard_plan, manifest, cfg.run.stall_timeout_s,
                         kd.store_mode, budget, lookahead=kd.lookahead_shards, writer=group.rank == 0,
                         stream_dir=layout.stream)
    inputs = StudentInputs(lambda epoch: ShardBatches(features, shard_plan, epoch, group.rank, group.size,
                                                      scfg.grad_accum, languages),
                           reader, device, loader_workers(device, cfg.run.loader_workers))

    trace = StepTrace(trace_path(cfg.run_path, group.rank), teachers) if cfg.run.trace_steps else None
    train_step = StudentTrainStep(engine, inputs, options, scalars, monitor, reader, heartbeat, producers, trace)

    def end_of_epoch(epoch: int, state: LoopState) -> None:
        train_step.flush(state.global_step)
        select_and_save(engine, tokenizer, dev_features, dev_examples, out_dir, cfg, group, state, epoch,
                        monitor, STUDENT, device)

    loop = GroupLoop(engine, group, layout.checkpoints(STUDENT), cfg.checkpoint,
                     desc="student", show_progress=group.rank == 0, heartbeat=heartbeat)
    if group.rank == 0:
        # Shards behind a checkpoint are never read again by a resumed student: free them.
        loop.on_checkpoint = lambda state: reader.commit_progress(state.epoch, state.step_in_epoch)
    if kd.precompute:  # the first read comes after every shard of every teacher is on disk
        reader.wait_for_every_shard(beat=lambda: heartbeat.beat(state=WAITING))
    try:
        state = loop.run(scfg.epochs, lambda epoch: len(shard_plan), train_step, end_of_epoch)
    finally:
        inputs.close()
        if trace is not None:
            trace.close()
    if group.rank == 0:
        write_done(out_dir, cfg, state, scfg.epochs, len(dev_features))
    # Time-shared producers have no work left: every student rank has read the last shard
    # (the ranks step together), and the producers of other ranks stop on the student's
    # finished heartbeat, beaten by loop.run.
    dist.barrier(group=group.process_group)
    monitor.close()
    release_engine(engine)
