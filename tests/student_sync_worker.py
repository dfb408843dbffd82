"""A world of one rank for tests/test_student_inputs.py: a real student loop (tiny BERT in
a DeepSpeed engine, GroupLoop, StudentTrainStep reading a store filled by real producers of
toy teachers) with every host read of a tensor made from the project's code (dist_xqa/)
on the main thread recorded with the step it happened in. Writes `<out>`: the reads by
step, the logging interval, the loop's stop-check interval and what TensorBoard got."""
from __future__ import annotations

import json
import sys
import threading
from collections import defaultdict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from transformers import BertConfig, BertForQuestionAnswering

from dist_xqa.config import CheckpointConfig, DistillConfig
from dist_xqa.distributed import build_engine, init_distributed, load_ds_config, make_groups, release_engine
from dist_xqa.logits import ShardPlan, StoreReader
from dist_xqa.monitor import Monitor
from dist_xqa.roles.loop import STOP_CHECK_EVERY, GroupLoop
from dist_xqa.plan import plan_roles
from dist_xqa.roles.student import (ShardBatches, StudentInputs, StudentScalars, StudentTrainStep, kd_options)
from dist_xqa.waiting import Heartbeat
from test_logit_store import SEQ_LEN, TEACHERS, make_manifest
from test_student_inputs import LANGS, fill_store, logged, toy_features

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dist_xqa"
TORCH = Path(torch.__file__).parent
EVERY = 4
STEPS = 12
# what reads a tensor's value back to the host (on an accelerator: waits for the device)
HOST_READS = {"item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__",
              "nonzero", "unique"}


class HostReads(TorchFunctionMode):
    """Records the project's host reads on the main thread (DeepSpeed's and torch's own are
    theirs; the read-ahead thread runs beside the step): origin 'dist_xqa/<file>:<function>'
    of the first caller frame outside torch."""

    def __init__(self):
        super().__init__()
        self.step: int | None = None
        self.reads: dict[int, list[str]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.step is not None and name in HOST_READS and threading.current_thread() is threading.main_thread():
            frame = sys._getframe(1)
            while frame is not None and Path(frame.f_code.co_filename).is_relative_to(TORCH):
                frame = frame.f_back
            path = Path(frame.f_code.co_filename) if frame is not None else None
            if path is not None and path.is_relative_to(PACKAGE):
                self.reads[self.step].append(f"{path.relative_to(ROOT)}:{frame.f_code.co_name}")
        return func(*args, **(kwargs or {}))


def main(run_dir: Path, out: Path) -> None:
    init_distributed()
    group = make_groups(plan_roles(1, ["en"]))["student"]
    features = toy_features(STEPS * 4)
    plan = ShardPlan([int(f) for f in features["feature_id"]], shard_size=4, seed=5)
    store = run_dir / "logits"
    fill_store(store, plan)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32,
                                                max_position_embeddings=SEQ_LEN))
    engine = build_engine(model, load_ds_config(ROOT / "ds_configs" / "zero2.json"), group, lr=1e-3,
                          weight_decay=0.0, micro_batch_size=2, gradient_accumulation_steps=2,
                          total_steps=STEPS, warmup_ratio=0.25)
    reader = StoreReader(store, list(TEACHERS), plan, make_manifest(plan), 60.0, "window", lookahead=len(plan))
    inputs = StudentInputs(lambda epoch: ShardBatches(features, plan, epoch, 0, 1, 2, LANGS), reader,
                           torch.device("cpu"), workers=0)
    monitor = Monitor(run_dir, "student", enabled=True, every=EVERY)
    heartbeat = Heartbeat(run_dir / "student.json", "student")
    step = StudentTrainStep(engine, inputs, kd_options(DistillConfig(), None),
                            StudentScalars(monitor, LANGS, list(TEACHERS), imp=True), monitor, reader, heartbeat, [])
    reads = HostReads()

    def train_step(epoch, position, state):
        reads.step = state.global_step  # reads until the next step's call count as this step's
        step(epoch, position, state)

    def end_of_epoch(epoch, state):
        reads.step = None  # model selection, checkpoints: not steps

    loop = GroupLoop(engine, group, run_dir / "ckpt", CheckpointConfig(every=10_000, keep=1), "student",
                     show_progress=False, heartbeat=heartbeat)
    try:
        with reads:
            loop.run(1, lambda epoch: len(plan), train_step, end_of_epoch)
    finally:
        inputs.close()
    monitor.close()
    release_engine(engine)
    out.write_text(json.dumps({"syncs": reads.reads, "every": EVERY, "stop_check_every": STOP_CHECK_EVERY,
                               "steps": len(plan), "logged": logged(run_dir, "student")}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
