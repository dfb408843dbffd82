"""Phase 1: train one extractive-QA model with span NLL on its role group -- a branch
teacher of LBMRC or a baseline model (zero-shot, translate-train, mixMRC).

Each epoch visits the job's features in a seeded permutation; the loop's checkpoints
carry (epoch, step), so a resumed run takes exactly the batches it would have taken.
At each epoch end the model is scored on the job's dev set and the best epoch is saved
in Hugging Face format (model selection on dev); without a dev set, the last epoch.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dist_xqa.config import RunConfig, TrainConfig, batch_for_group
from dist_xqa.distributed import TrainingGroup, build_engine, release_engine
from dist_xqa.evaluate import postprocess, score
from dist_xqa.inference import model_inputs
from dist_xqa.losses import span_nll
from dist_xqa.models import build_model, save_hf
from dist_xqa.monitor import Monitor
from dist_xqa.prepare import Job, Prepared
from dist_xqa.logits.files import write_json
from dist_xqa.logits.heartbeat import Heartbeat, role_heartbeat
from dist_xqa.roles.loop import GroupLoop, LoopState, full_state_dict, group_predict, rank_slice

log = logging.getLogger(__name__)
LABELS = ("answer_mask", "start_positions", "end_positions")


def label_tensors(features, rows: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(mask [B, L] bool, start [B], end [B]) for feature rows."""
    cols = features.select_columns(list(LABELS))[rows]
    mask = torch.as_tensor(np.asarray(cols["answer_mask"]), device=device).bool()
    return (mask, torch.as_tensor(cols["start_positions"], device=device),
            torch.as_tensor(cols["end_positions"], device=device))


def dev_f1(module, features, examples, cfg: RunConfig, device, group) -> float:
    """F1 (pooled over every language pair) of `module` on a dev set; the same on every
    rank of the group, since every rank decodes the same gathered logits."""
    start, end = group_predict(module, features, cfg.eval.batch_size, device, group)
    preds = postprocess(features, start, end, examples, cfg.eval.n_best, cfg.eval.max_answer_length)
    return score(examples, preds, cfg.data.normalization)["pooled"]["f1"]


def select_and_save(engine, tokenizer, dev_features, dev_examples, out_dir: Path, cfg: RunConfig, group,
                    state: LoopState, epoch: int, monitor: Monitor, tag: str, device: torch.device) -> None:
    """End of an epoch: score on dev and save the model in Hugging Face format if it is
    the best so far (or every epoch, keeping the last, without dev selection)."""
    select = cfg.eval.select_on_dev and len(dev_features) > 0
    f1 = dev_f1(engine.module, dev_features, dev_examples, cfg, device, group) if select else -1.0
    if select:
        monitor.scalar(f"{tag}/dev_f1", f1, state.global_step)
    if f1 > state.best_metric or not select:
        state.best_metric, state.best_epoch = f1, epoch
        weights = full_state_dict(engine)
        if group.rank == 0:
            save_hf(engine.module, tokenizer, out_dir, state_dict=weights)
            log.info("%s: epoch %d dev F1 %.2f, saved to %s", tag, epoch + 1, f1, out_dir)


def write_done(out_dir: Path, cfg: RunConfig, state: LoopState, epochs: int, dev_size: int) -> None:
    selection = "best dev F1" if cfg.eval.select_on_dev and dev_size else "last epoch (no dev selection)"
    write_json(out_dir / "DONE.json", {"selected_epoch": state.best_epoch + 1, "dev_f1": state.best_metric,
                                       "selection": selection, "epochs": epochs})


def micro_batches(rows: list[int], micro_batch_size: int) -> list[list[int]]:
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)] or [[]]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def output_dir(cfg: RunConfig, job: Job) -> Path:
    sub = "teachers" if cfg.strategy.name == "lbmrc" else "models"
    return cfg.run_path / sub / job.name


def train_job(job: Job, cfg: RunConfig, prepared: Prepared, ds_config: dict, group: TrainingGroup,
              device: torch.device) -> None:
    """Train `job` on the ranks of `group` (every rank of the group calls this)."""
    out_dir = output_dir(cfg, job)
    if (out_dir / "DONE.json").exists():
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
    monitor = Monitor(cfg.run_path, tag.replace("/", "_"), enabled=group_rank == 0)

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

    role = tag.replace("/", "_")  # teacher_<lang> | model_<name>: what the evaluator calls the model
    loop = GroupLoop(engine, group, cfg.run_path / "checkpoints" / role, cfg.checkpoint, desc=job.name,
                     show_progress=group_rank == 0,
                     heartbeat=Heartbeat(role_heartbeat(cfg.run_path, role, group_rank), role))
    state = loop.run(tcfg.epochs, lambda epoch: steps, train_step, end_of_epoch)
    if group_rank == 0:
        write_done(out_dir, cfg, state, tcfg.epochs, len(dev_features))
    dist.barrier(group=group.process_group)
    monitor.close()
    release_engine(engine)
