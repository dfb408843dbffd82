"""One rank of the GroupLoop test in tests/test_group_engines.py, launched by torchrun:
a real DeepSpeed engine (gloo, tiny BertForQuestionAnswering) on a group of every rank
runs `--epochs` epochs of `--steps` steps through GroupLoop with checkpoint rotation and
a heartbeat, resuming from the group's newest checkpoint when there is one. Each rank
writes `<out>/rank<r>.json`: the tags on disk after every save, the tag it resumed
from and the final loop state (or why it stopped: SIGUSR1 or SIGTERM checkpoints and stops); rank r logs to `<out>/rank<r>.log` (GroupLoop's removal lines).
With `--eval-rows`, each epoch ends with a dev evaluation of that many rows over the group
(group_predict, `--eval-sleep` seconds a batch), recorded as `evaluations` (epochs whose
evaluation finished) and `eval_batches` (batches this rank ran)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import datasets
import torch

from dist_worker import SEQ_LEN, batch, new_engine
from dist_xqa.config import CheckpointConfig
from dist_xqa.distributed import init_distributed, load_ds_config, make_groups, release_engine
from dist_xqa.roles.loop import GroupLoop, group_predict
from dist_xqa.plan import plan_roles
from dist_xqa.waiting import Heartbeat, Preempted, install_stop_signal, role_heartbeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (time to send a signal)")
    parser.add_argument("--eval-rows", type=int, default=0)
    parser.add_argument("--eval-sleep", type=float, default=0.0, help="seconds per evaluation batch")
    args = parser.parse_args()
    install_stop_signal()  # SIGUSR1: checkpoint and stop, as under Slurm

    ctx = init_distributed(timeout=timedelta(seconds=300))
    logging.basicConfig(filename=args.out / f"rank{ctx.rank}.log", level=logging.INFO)
    plan = plan_roles(ctx.world_size, ["en"], student_min_ranks=ctx.world_size)
    group = make_groups(plan)[plan.student.name]
    ds_config = load_ds_config(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json")
    engine = new_engine(group, ds_config)
    ckpt_dir = args.out / "ckpt"
    heartbeat = Heartbeat(role_heartbeat(args.out, "student", group.rank), "student")
    loop = GroupLoop(engine, group, ckpt_dir, CheckpointConfig(every=args.every, keep=args.keep), desc="student",
                     show_progress=False, heartbeat=heartbeat)
    record = {"saves": [], "evaluations": [], "eval_batches": 0}
    loop.on_checkpoint = lambda state: record["saves"].append(
        [state.global_step, sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())])

    def train_step(epoch: int, i: int, state) -> None:
        loss = engine(**batch("student", group.rank, state.global_step)).loss
        engine.backward(loss)
        engine.step()
        time.sleep(args.step_sleep)

    class SlowDev(torch.nn.Module):
        """The model, `--eval-sleep` seconds a batch: a dev evaluation long enough to signal."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            record["eval_batches"] += 1
            time.sleep(args.eval_sleep)
            return self.model(**inputs)

    dev = datasets.Dataset.from_dict({name: [[1] * SEQ_LEN] * args.eval_rows
                                      for name in ("input_ids", "attention_mask", "token_type_ids")})

    def end_of_epoch(epoch: int, state) -> None:
        if args.eval_rows:
            start, _ = group_predict(SlowDev(engine.module), dev, 4, engine.device, group)
            record["evaluations"].append([epoch, len(start)])

    record["resumed_from"] = (ckpt_dir / "latest").read_text() if (ckpt_dir / "latest").exists() else None
    try:
        state = loop.run(args.epochs, lambda epoch: args.steps, train_step, end_of_epoch)
        record["final"] = asdict(state)
    except Preempted as stop:
        record["preempted"] = str(stop)
    (args.out / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    release_engine(engine)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
