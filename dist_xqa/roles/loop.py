"""The epoch/step loop every training group runs (teachers, baselines and the student),
with DeepSpeed checkpoints that carry the data position, so rerunning the same command
resumes exactly where the group stopped; plus the group-wide helpers the loop needs
(evaluation forward passes spread over the group, gathering ZeRO-3 weights for saving).

Every rank of a group calls every function here in the same order: they issue
collectives on the group's process group only, never on the world.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dist_xqa.distributed import TrainingGroup, group_scope
from dist_xqa.inference import predict_logits
from dist_xqa.logits.order import rank_rows

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps of `epoch` already taken
    global_step: int = 0
    best_metric: float = -math.inf  # best dev F1 so far (model selection)
    best_epoch: int = -1


class GroupLoop:
    """Runs `epochs` of `steps(epoch)` optimizer steps, each done by `train_step(epoch,
    i)`, checkpointing every `checkpoint_every` steps and at every epoch end, and calling
    `end_of_epoch(epoch, state)` (model selection) after each epoch."""

    def __init__(self, engine, group: TrainingGroup, ckpt_dir: Path, checkpoint_every: int, desc: str, show_progress: bool):
        self.engine = engine
        self.group = group
        self.ckpt_dir = Path(ckpt_dir)
        self.checkpoint_every = checkpoint_every
        self.desc = desc
        self.show_progress = show_progress
        self.on_checkpoint: Callable[[LoopState], None] | None = None

    def resume(self) -> LoopState:
        if not (self.ckpt_dir / "latest").exists():
            return LoopState()
        with group_scope(self.group):
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir), load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        state = LoopState(**client["loop"]) if client and "loop" in client else LoopState()
        log.info("%s: resumed from %s at epoch %d step %d (global step %d)", self.desc, self.ckpt_dir,
                 state.epoch + 1, state.step_in_epoch, state.global_step)
        return state

    def save(self, state: LoopState) -> None:
        with group_scope(self.group):  # DeepSpeed's barriers must stay inside the group
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{state.global_step}",
                                        client_state={"loop": asdict(state)})
        if self.on_checkpoint is not None:
            self.on_checkpoint(state)

    def run(self, epochs: int, steps: Callable[[int], int], train_step: Callable[[int, int, LoopState], None],
            end_of_epoch: Callable[[int, LoopState], None]) -> LoopState:
        state = self.resume()
        while state.epoch < epochs:
            n = steps(state.epoch)
            bar = tqdm(total=n, initial=state.step_in_epoch, desc=f"{self.desc} epoch {state.epoch + 1}/{epochs}",
                       disable=not self.show_progress, leave=False)
            while state.step_in_epoch < n:
                train_step(state.epoch, state.step_in_epoch, state)
                state.step_in_epoch += 1
                state.global_step += 1
                bar.update(1)
                if state.global_step % self.checkpoint_every == 0 and state.step_in_epoch < n:
                    self.save(state)
            bar.close()
            end_of_epoch(state.epoch, state)
            state.epoch += 1
            state.step_in_epoch = 0
            self.save(state)
        return state


def rank_slice(rows: list[int], group: TrainingGroup) -> list[int]:
    """This rank's part of `rows`: contiguous, disjoint across the group, sizes differing
    by at most one, the union is `rows`."""
    part = rank_rows(len(rows), group.rank, group.size)
    return rows[part]


def group_predict(module: torch.nn.Module, features, batch_size: int, device: torch.device,
                  group: TrainingGroup) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits for every feature, computed by the whole group (each rank a slice)
    and gathered on every rank. Every rank runs the same number of forward passes, as
    ZeRO-3 gathers parameters collectively inside each forward."""
    size = group.size
    rows = list(range(len(features)))
    per = math.ceil(len(rows) / size) if rows else 0
    mine = rank_slice(rows, group)
    padded = mine + [rows[0]] * (per - len(mine)) if rows else []
    start, end = predict_logits(module, features, batch_size, device, padded)
    parts: list = [None] * size
    dist.all_gather_object(parts, (start[:len(mine)], end[:len(mine)]), group=group.process_group)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on every rank of the group (ZeRO-3 partitions are
    gathered within the group; DeepSpeed's own consolidation assumes global rank 0)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
