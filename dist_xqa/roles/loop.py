"""The epoch/step loop every training group runs (teachers, baselines and the student),
with DeepSpeed checkpoints that carry the data position and each rank's random state, so
rerunning the same command resumes exactly where the group stopped (the newest `checkpoint.keep` checkpoints are
kept, older ones removed); the loop beats the role's heartbeat (dist_xqa/waiting.py) on
every step, so ranks waiting for this role know it progresses; plus the group-wide helpers the loop needs
(each epoch's row order, evaluation forward passes spread over the group, gathering
ZeRO-3 weights for saving).

Every rank of a group calls every function here in the same order: they issue
collectives on the group's process group only, never on the world.
"""
from __future__ import annotations

import io
import logging
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from dist_xqa.config import CheckpointConfig
from dist_xqa.distributed import TrainingGroup, group_scope
from dist_xqa.files import atomic_write
from dist_xqa.inference import predict_logits
from dist_xqa.logits.order import rank_rows
from dist_xqa.monitor import progress
from dist_xqa.waiting import FINISHED, Heartbeat, Preempted, stop_requested

log = logging.getLogger(__name__)
TAG = re.compile(r"step(\d+)")  # DeepSpeed checkpoint tags: step<global step>
# The group agrees on a stop request every this many steps: the agreement is a collective
# whose result is read back to the host, which on an accelerator waits for the step.
STOP_CHECK_EVERY = 10


class _EvaluationStopped(Exception):
    """Raised inside a group's end-of-epoch evaluation once the group agreed to stop."""


# The loop whose end-of-epoch evaluation runs now on this rank (GroupLoop._evaluate): its
# group_predict calls check for a stop between batches. Module state, because the roles'
# end_of_epoch callbacks reach group_predict through model selection, which knows no loop.
_evaluating: GroupLoop | None = None


@dataclass
class LoopState:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps of `epoch` already taken
    global_step: int = 0
    best_metric: float = -math.inf  # best dev F1 so far (model selection)
    best_epoch: int = -1


class GroupLoop:
    """Runs `epochs` of `steps(epoch)` optimizer steps, each done by `train_step(epoch,
    i)`, checkpointing every `checkpoint.every` steps and at every epoch end (keeping the
    newest `checkpoint.keep`), and calling `end_of_epoch(epoch, state)` (model selection)
    after each epoch. `heartbeat` is beaten on every step, marked finished at the end and
    failed when the loop raises. When a rank of the group has been asked to stop
    (heartbeat.install_stop_signal), the group checkpoints at its next step that is a
    multiple of STOP_CHECK_EVERY and raises Preempted. A stop during the end-of-epoch dev
    evaluation (minutes at full scale, longer than a signal's lead time) is agreed between
    its batches (group_predict): the group checkpoints the finished epoch's steps and the
    resumed group evaluates that epoch again."""

    def __init__(self, engine, group: TrainingGroup, ckpt_dir: Path, checkpoint: CheckpointConfig, desc: str,
                 show_progress: bool, heartbeat: Heartbeat | None = None):
        self.engine = engine
        self.group = group
        self.ckpt_dir = Path(ckpt_dir)
        self.checkpoint = checkpoint
        self.desc = desc
        self.show_progress = show_progress
        self.heartbeat = heartbeat
        self.on_checkpoint: Callable[[LoopState], None] | None = None
        self._eval_batches, self._eval_state = 0, LoopState()  # the end-of-epoch evaluation in progress

    def resume(self) -> LoopState:
        if not (self.ckpt_dir / "latest").exists():
            return LoopState()
        with group_scope(self.group):
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir), load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        state = LoopState(**client["loop"]) if client and "loop" in client else LoopState()
        log.info("%s: resumed from %s at epoch %d step %d (global step %d)", self.desc, self.ckpt_dir,
                 state.epoch + 1, state.step_in_epoch, state.global_step)
        rng = self._rng_path(state.global_step)
        if rng.exists():
            set_rng_state(torch.load(rng), self.engine.device)
        else:
            log.warning("%s: no random state of rank %d in %s: dropout after the resume differs from an "
                        "uninterrupted run's", self.desc, self.group.rank, rng.parent)
        return state

    def _rng_path(self, global_step: int) -> Path:
        return self.ckpt_dir / f"step{global_step}" / f"rng_state.{self.group.rank}.pt"

    def save(self, state: LoopState) -> None:
        self._beat(state, "checkpointing")
        tag = f"step{state.global_step}"
        # Each rank's random state (dropout) goes with the checkpoint (DeepSpeed saves
        # none): a resumed group then draws what an uninterrupted one would have.
        rng = self._rng_path(state.global_step)
        rng.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(rng_state(self.engine.device), buffer)
        atomic_write(rng, buffer.getvalue())
        with group_scope(self.group):  # DeepSpeed's barriers must stay inside the group
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state={"loop": asdict(state)},
                                        save_latest=False)
        if self.group.rank == 0:
            # `latest` names the tag once every rank has written its part (save_checkpoint
            # ends with the group's barrier). DeepSpeed's own `latest` comes before that
            # barrier: a job killed right after it resumed from a torn optimizer state.
            atomic_write(self.ckpt_dir / "latest", tag.encode())
            self._rotate(state.global_step)
        if self.on_checkpoint is not None:
            self.on_checkpoint(state)

    def _rotate(self, saved: int) -> None:
        """Keeps the newest `checkpoint.keep` tags up to the one just saved at step `saved`
        (`latest` names it; every rank of the group has written it once save_checkpoint
        returns). Tags of later steps are left by a run that went further before it was
        killed and this one resumed from an earlier tag: nothing will resume from them."""
        tags = sorted((int(m.group(1)), path) for path in self.ckpt_dir.iterdir()
                      if path.is_dir() and (m := TAG.fullmatch(path.name)))
        kept = [path for step, path in tags if step <= saved][-self.checkpoint.keep:]
        removed = [path for _, path in tags if path not in kept]
        for path in removed:
            shutil.rmtree(path)
        if removed:
            log.info("%s: removed checkpoint(s) %s (checkpoint.keep = %d)", self.desc,
                     ", ".join(p.name for p in removed), self.checkpoint.keep)

    def _stop_agreed(self) -> bool:
        """Whether any rank of the group was asked to stop: the signal reaches the ranks
        at different steps, and they must checkpoint at the same one."""
        flag = torch.tensor([float(stop_requested())], device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group.process_group)
        return bool(flag.item())

    def _beat(self, state: LoopState, what: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat(state.global_step, what, epoch=state.epoch, step_in_epoch=state.step_in_epoch)

    def run(self, epochs: int, steps: Callable[[int], int], train_step: Callable[[int, int, LoopState], None],
            end_of_epoch: Callable[[int, LoopState], None]) -> LoopState:
        if self.heartbeat is None:
            return self._run(epochs, steps, train_step, end_of_epoch)
        with self.heartbeat.guard():  # waiters stop at once when this role fails
            state = self._run(epochs, steps, train_step, end_of_epoch)
        self.heartbeat.beat(state.global_step, FINISHED, force=True, epoch=state.epoch)
        return state

    def _run(self, epochs: int, steps: Callable[[int], int], train_step: Callable[[int, int, LoopState], None],
             end_of_epoch: Callable[[int, LoopState], None]) -> LoopState:
        state = self.resume()
        while state.epoch < epochs:
            n = steps(state.epoch)
            bar = progress(n, f"{self.desc} epoch {state.epoch + 1}/{epochs}", enabled=self.show_progress,
                           initial=state.step_in_epoch)
            while state.step_in_epoch < n:
                self._beat(state, "training")
                train_step(state.epoch, state.step_in_epoch, state)
                state.step_in_epoch += 1
                state.global_step += 1
                bar.update(1)
                if state.global_step % STOP_CHECK_EVERY == 0 and self._stop_agreed():
                    self.save(state)
                    raise Preempted(f"{self.desc}: stopped by a signal at global step {state.global_step}, "
                                    f"checkpointed in {self.ckpt_dir}")
                if state.global_step % self.checkpoint.every == 0 and state.step_in_epoch < n:
                    self.save(state)
            bar.close()
            self._evaluate(end_of_epoch, state)
            state.epoch += 1
            state.step_in_epoch = 0
            self.save(state)
        return state

    def _evaluate(self, end_of_epoch: Callable[[int, LoopState], None], state: LoopState) -> None:
        global _evaluating
        self._beat(state, "evaluating")
        _evaluating, self._eval_batches, self._eval_state = self, 0, state
        try:
            end_of_epoch(state.epoch, state)
        except _EvaluationStopped:
            # The state is the one before the evaluation (model selection updates it only
            # after scoring): resumed, the loop finds the epoch's steps done and evaluates.
            self.save(state)
            raise Preempted(f"{self.desc}: stopped by a signal during the evaluation of epoch {state.epoch + 1} "
                            f"(global step {state.global_step}), checkpointed in {self.ckpt_dir}") from None
        finally:
            _evaluating = None

    def _between_batches(self) -> None:
        """After each batch of the end-of-epoch evaluation: beats (the evaluation is
        progress to whoever waits for this role) and stops when the group agrees to."""
        self._eval_batches += 1
        if self.heartbeat is not None:
            self.heartbeat.beat(self._eval_state.global_step, "evaluating", epoch=self._eval_state.epoch,
                                step_in_epoch=self._eval_state.step_in_epoch, batches=self._eval_batches)
        if self._stop_agreed():
            raise _EvaluationStopped()


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random state a training step draws from on `device` (dropout): the CPU's, and
    the accelerator's own on one."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rank_slice(rows: list[int], group: TrainingGroup) -> list[int]:
    """This rank's part of `rows`: contiguous, disjoint across the group, sizes differing
    by at most one, the union is `rows`."""
    part = rank_rows(len(rows), group.rank, group.size)
    return rows[part]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which a group's steps visit `n` rows in `epoch`: a permutation seeded
    by the run's seed and the epoch, so a resumed run takes the batches it would have taken."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def group_predict(module: torch.nn.Module, features, batch_size: int, device: torch.device,
                  group: TrainingGroup) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits for every feature, computed by the whole group (each rank a slice)
    and gathered on every rank. Every rank runs the same number of forward passes, as
    ZeRO-3 gathers parameters collectively inside each forward, so inside a GroupLoop's
    end-of-epoch evaluation the group can agree on a stop between batches."""
    loop = _evaluating if _evaluating is not None and _evaluating.group == group else None
    size = group.size
    rows = list(range(len(features)))
    per = math.ceil(len(rows) / size) if rows else 0
    mine = rank_slice(rows, group)
    padded = mine + [rows[0]] * (per - len(mine)) if rows else []
    start, end = predict_logits(module, features, batch_size, device, padded,
                                after_batch=loop._between_batches if loop is not None else None)
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
