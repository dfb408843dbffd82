"""Supervised training of one extractive-QA model with span NLL on its role group: a
branch teacher of LBMRC (phase 1), a baseline's model (zero-shot, translate-train,
mixMRC: its only training) or SKD's optional source-language model. Named for what it
does rather than for a phase: the same code is phase 1 of LBMRC and SKD and the whole
training of a baseline.

Each epoch visits the job's features in a seeded permutation; the loop's checkpoints
carry (epoch, step), so a resumed run takes exactly the batches it would have taken.
At each epoch end the model is scored on the job's dev set and the best epoch is saved
in Hugging Face format (roles/selection.py); without a dev set, the last epoch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from dist_xqa.config import RunConfig, TrainConfig, batch_for_group
from dist_xqa.distributed import TrainingGroup, build_engine, release_engine
from dist_xqa.inference import label_tensors, model_inputs
from dist_xqa.jobs import Job, job_dir
from dist_xqa.layout import RunLayout
from dist_xqa.losses import span_nll
from dist_xqa.models import build_model
from dist_xqa.monitor import Monitor
from dist_xqa.prepared import Prepared
from dist_xqa.roles.loop import GroupLoop, LoopState, epoch_order, rank_slice
from dist_xqa.roles.selection import select_and_save, write_done
from dist_xqa.waiting import Heartbeat, role_heartbeat


def micro_batches(rows: list[int], micro_batch_size: int) -> list[list[int]]:
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)] or [[]]


def train_job(job: Job, cfg: RunConfig, prepared: Prepared, ds_config: dict, group: TrainingGroup,
              device: torch.device) -> None:
    """Train `job` on the ranks of `group` (every rank of the group calls this)."""
    layout = RunLayout(cfg.run_path)
    out_dir = job_dir(cfg, job)
    if layout.done(out_dir).exists():
        return
    tcfg: TrainConfig = batch_for_group(cfg.teacher, group.size)
    group_rank, group_size = group.rank, group.size
    tokenizer = prepared.tokenizer()
    features = prepared.features(job.train_set)
    dev_features, dev_examples = prepared.features(job.dev_set), prepared.examples(job.dev_set)
    seed = cfg.seed + job.seed_offset  # "w/ mix" teachers differ only by their seed
    model = build_model(cfg.model, tokenizer, seed=seed)
    global_batch = tcfg.micro_batch_size * tcfg.grad_accum * group_size
    steps = math.ceil(len(features) / global_batch)
    engine = build_engine(model, ds_config, group, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                          micro_batch_size=tcfg.micro_batch_size, gradient_accumulation_steps=tcfg.grad_accum,
                          total_steps=steps * tcfg.epochs, warmup_ratio=tcfg.warmup_ratio)
    tag = f"teacher/{job.name}" if cfg.strategy.name == "lbmrc" else f"model/{job.name}"
    monitor = Monitor(cfg.run_path, layout.model_name(out_dir), enabled=group_rank == 0, every=cfg.monitor.every)

    def train_step(epoch: int, i: int, state: LoopState) -> None:
        order = epoch_order(len(features), seed, epoch)
        rows = [int(r) for r in order.take(range(i * global_batch, (i + 1) * global_batch), mode="wrap")]
        losses = []
        for micro in micro_batches(rank_slice(rows, group), tcfg.micro_batch_size):
            out = engine(**model_inputs(features, micro, device))
            mask, start_pos, end_pos = label_tensors(features, micro, device)
            loss = span_nll(out.start_logits.float(), out.end_logits.float(), mask, start_pos, end_pos)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        monitor.scalar(f"{tag}/loss", float(np.mean(losses)), state.global_step)
        monitor.scalar(f"{tag}/lr", engine.get_lr()[0], state.global_step)
        monitor.throughput(len(rows), state.global_step)

    def end_of_epoch(epoch: int, state: LoopState) -> None:
        select_and_save(engine, tokenizer, dev_features, dev_examples, out_dir, cfg, group, state, epoch,
                        monitor, tag, device)

    role = layout.model_name(out_dir)  # teacher_<lang> | model_<name>
    loop = GroupLoop(engine, group, layout.checkpoints(role), cfg.checkpoint, desc=job.name,
                     show_progress=group_rank == 0,
                     heartbeat=Heartbeat(role_heartbeat(cfg.run_path, role, group_rank), role))
    state = loop.run(tcfg.epochs, lambda epoch: steps, train_step, end_of_epoch)
    if group_rank == 0:
        write_done(out_dir, cfg, state, tcfg.epochs, len(dev_features))
    dist.barrier(group=group.process_group)
    monitor.close()
    release_engine(engine)
