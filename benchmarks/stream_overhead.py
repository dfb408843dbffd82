"""Benchmark what streaming the teachers' logits costs the student (DESIGN.md section 2,
"Streaming, not precomputing").

Same student model, global batch, ranks and feature batches for every variant:

- streamed: the student's own train step (roles/student.py StudentTrainStep): its
  micro-batches from a DataLoader over the features and each step's teacher logits from
  the sharded logit store (dist_xqa.logits.StoreReader), read ahead on a side thread,
  then dist_xqa.losses.student_loss with the entropy-weighted KD
  (dist_xqa.kernels.entropy_weighted_kd), its scalars kept on the device and written every
  `monitor.every` steps. The store is ahead of the student: before each timed block the
  producers (dist_xqa.logits.Producer, a real teacher forward per shard) have written
  every shard the block reads, so the student never waits on a producer;
- plain: fine-tuning on the span NLL alone (dist_xqa.losses.span_nll), no teachers;
- inprocess: the K frozen teachers run forward (no_grad) on the same batch inside each
  student step, then the same step (roles/student.py student_step): what the student
  would pay without a store.

Host time per step: the seconds of a step spent outside the engine's forward, backward
and optimizer step (`outside_engine_ms`: batch assembly, logit reads, waiting for the
read-ahead, logging, and the loss itself, the same in every version of the step).

Also measured: samples/s of each producer (teacher forward + shard write, per producer
rank), and the peak logit bytes on disk during the streamed run against the size of a
full precompute, K x |D| x 2 x L x bytes per value.

The run goes in blocks of `--lookahead` shards (one full look-ahead window): the producers
fill the window, untimed, then the three variants take turns step by step (rotating
order, each step timed on its own, the same shard's features for all three), so a slow
moment of a shared machine falls on every variant alike. After each block the student
commits its progress, as at a checkpoint, so window-mode clean-up frees the shards behind
it; the peak on disk is then the look-ahead window. (A real student frees shards only at
its checkpoints and keeps every shard from the last one on, so it holds up to
K x (checkpoint_every + lookahead) shards.) samples/s = timed steps x global batch /
their summed time; the median step, and the median of the per-step ratios (step i of
each variant trains on the same features), are reported too, as checks against
outliers on a busy machine.

Run:   python benchmarks/stream_overhead.py              (GPU: base-size encoder, L = 384)
       python benchmarks/stream_overhead.py --smoke      (tiny shapes; seconds on a CPU)
       deepspeed --num_gpus N benchmarks/stream_overhead.py   (or torchrun: N student ranks,
                                                               producers shared with them)
Without a GPU the defaults shrink to the demo's tiny model (L = 160, batch 16).
Writes JSON (default benchmarks/results/stream_overhead.json) and prints a table.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator when first imported (dist_xqa.roles imports it).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402

from dist_xqa import kernels  # noqa: E402
from dist_xqa.config import DistillConfig, ModelConfig  # noqa: E402
from dist_xqa.distributed import build_engine, init_distributed, load_ds_config, make_groups, release_engine  # noqa: E402
from dist_xqa.inference import label_tensors, model_inputs, predict_logits  # noqa: E402
from dist_xqa.logits import Manifest, Producer, ShardPlan, StoreReader, rank_rows  # noqa: E402
from dist_xqa.logits.shards import LOGIT_DTYPES, list_shards  # noqa: E402
from dist_xqa.losses import span_nll  # noqa: E402
from dist_xqa.models import build_model  # noqa: E402
from dist_xqa.monitor import Monitor  # noqa: E402
from dist_xqa.roles.loop import LoopState  # noqa: E402
from dist_xqa.plan import plan_roles  # noqa: E402
from dist_xqa.roles.student import (ShardBatches, StudentInputs, StudentScalars, StudentTrainStep,  # noqa: E402
                                    kd_options, loader_workers, student_step)
from dist_xqa.waiting import Heartbeat  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "stream_overhead.json"
VARIANTS = ("plain", "streamed", "inprocess")
TARGET_RATIO = 0.95

# GPU: a base-size encoder with XLM-R's vocabulary (the paper's backbone is XLM), SQuAD length.
GPU_DEFAULTS = dict(seq_len=384, batch=32, steps=32, warmup=4, hidden=768, layers=12, heads=12,
                    intermediate=3072, vocab=250002)
# CPU: the demo config's tiny model (dist_xqa.config.ModelConfig) at its max length.
CPU_DEFAULTS = dict(seq_len=160, batch=16, steps=16, warmup=2, hidden=128, layers=2, heads=2,
                    intermediate=256, vocab=2000)
SMOKE_DEFAULTS = dict(seq_len=64, batch=4, steps=4, warmup=1, hidden=32, layers=1, heads=2,
                      intermediate=64, vocab=500, lookahead=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: a quick CPU run")
    parser.add_argument("--seq-len", type=int, help="L (default 384 on GPU, 160 on CPU, 64 with --smoke)")
    parser.add_argument("--batch", type=int, help="global batch = shard size, split over the student ranks")
    parser.add_argument("--steps", type=int, help="timed student steps per variant")
    parser.add_argument("--warmup", type=int, help="untimed student steps per variant first")
    parser.add_argument("--teachers", type=int, default=3, help="K")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--lookahead", type=int, help="producers' look-ahead in shards = timed block (default 8)")
    parser.add_argument("--features", type=int, default=0,
                        help="|D|, the distillation set's features (default: just the shards the run reads)")
    parser.add_argument("--producer-batch", type=int, default=64, help="teacher forward batch of a producer")
    parser.add_argument("--logits-dtype", choices=sorted(LOGIT_DTYPES), default="float16")
    parser.add_argument("--aggregation", choices=["imp", "hyper"], default="imp")
    parser.add_argument("--ds-config", type=Path, default=ROOT / "ds_configs" / "zero2.json")
    parser.add_argument("--store-dir", type=Path, default=None,
                        help="where the logit store goes (a fresh subdirectory, removed at the end; "
                             "default: the system temp dir). Put it on the run filesystem to measure that.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids oversubscribing a busy small CPU")
    parser.add_argument("--local_rank", type=int, help="passed by the deepspeed launcher (also in LOCAL_RANK)")
    args = parser.parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lookahead is None:
        args.lookahead = 8  # dist_xqa.config.DistillConfig.lookahead_shards
    for key in ("seq_len", "batch", "steps", "teachers", "lookahead", "producer_batch"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


# --- synthetic inputs and models ----------------------------------------------------------------


def synthetic_features(n: int, length: int, vocab: int, languages: list[str], seed: int) -> Dataset:
    """n QA features shaped like dist_xqa's: [CLS] question [SEP] context [SEP] padding, a
    positions mask of CLS and the context tokens, span labels inside the context (a quarter
    of the features unanswerable in their window: start = end = CLS)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(5, vocab, size=(n, length), dtype=np.int64)
    attention = np.zeros((n, length), np.int64)
    token_type = np.zeros((n, length), np.int64)
    answer_mask = np.zeros((n, length), bool)
    start = np.zeros(n, np.int64)
    end = np.zeros(n, np.int64)
    for i in range(n):
        used = int(rng.integers(max(8, length // 2), length + 1))  # tokens before padding
        question = int(rng.integers(1, max(2, min(30, used // 4))))
        ctx_begin, ctx_end = question + 2, used - 1  # context = [ctx_begin, ctx_end)
        input_ids[i, 0], input_ids[i, question + 1], input_ids[i, used - 1] = 2, 3, 3
        input_ids[i, used:] = 0
        attention[i, :used] = 1
        token_type[i, ctx_begin:used] = 1
        answer_mask[i, 0] = True
        answer_mask[i, ctx_begin:ctx_end] = True
        if rng.random() >= 0.25 and ctx_end > ctx_begin:
            start[i] = int(rng.integers(ctx_begin, ctx_end))
            end[i] = min(ctx_end - 1, start[i] + int(rng.integers(0, 8)))
    return Dataset.from_dict({
        "feature_id": np.arange(n, dtype=np.int64) + 100_000,
        "input_ids": input_ids, "attention_mask": attention, "token_type_ids": token_type,
        "answer_mask": answer_mask.astype(np.int8), "start_positions": start, "end_positions": end,
        "context_lang": [languages[i % len(languages)] for i in range(n)],
    })


class _Vocabulary:
    """What dist_xqa.models.build_model reads from a tokenizer: its size and pad id."""

    pad_token_id = 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def qa_model(args: argparse.Namespace, seed: int) -> torch.nn.Module:
    """A freshly initialised BERT QA model through the project's own builder ("tiny" path)."""
    cfg = ModelConfig(name="tiny", max_length=args.seq_len, tiny={
        "hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "intermediate_size": args.intermediate})
    return build_model(cfg, _Vocabulary(args.vocab), seed=seed)


# --- measuring ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def store_usage(store: Path, teachers: list[str]) -> tuple[int, int]:
    """(bytes, committed shard files) of logit files in the store, temporaries included."""
    total, shards = 0, 0
    for teacher in teachers:
        directory = store / teacher
        committed = list_shards(directory)
        shards += len(committed)
        for path in list(committed.values()) + list(directory.glob(".*.tmp")):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
    return total, shards


class TimedEngine:
    """The engine with the seconds spent in its forward, backward and step counted: the
    rest of a step is its host-side work (and the loss)."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def _timed(self, fn, *args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - began

    def __call__(self, *args, **kwargs):
        return self._timed(self.engine, *args, **kwargs)

    def backward(self, *args, **kwargs):
        return self._timed(self.engine.backward, *args, **kwargs)

    def step(self, *args, **kwargs):
        return self._timed(self.engine.step, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def segments(warmup: int, steps: int, block: int) -> list[tuple[range, bool]]:
    """Run-wide shard indices in chunks of at most one look-ahead window: (indices, timed)."""
    out, index = [], 0
    for count, timed in ((warmup, False), (steps, True)):
        end = index + count
        while index < end:
            out.append((range(index, min(index + block, end)), timed))
            index = out[-1][0].stop
    return out


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    ctx = init_distributed()
    if args.threads is not None:  # after init_distributed, which sets its own share of the cores
        torch.set_num_threads(args.threads)
    device = ctx.device
    cuda = device.type == "cuda"
    world, rank = ctx.world_size, ctx.rank
    if args.batch % world:
        sys.exit(f"--batch {args.batch} must be a multiple of the {world} student rank(s)")
    teacher_names = [f"t{k}" for k in range(args.teachers)]
    # Every rank is a student rank; producers share them (DESIGN.md: time-shared roles).
    plan = plan_roles(world, teacher_names, student_min_ranks=world)
    group = make_groups(plan)[plan.student.name]
    barrier = (lambda: dist.barrier(group=group.process_group)) if world > 1 else (lambda: None)

    # The distillation set: every shard the run reads (warm-up + timed), or --features.
    shards_read = args.warmup + args.steps
    n_features = max(args.features, shards_read * args.batch)
    n_features = -(-n_features // args.batch) * args.batch  # whole shards only
    features = synthetic_features(n_features, args.seq_len, args.vocab, teacher_names, args.seed)
    feature_ids = [int(f) for f in features["feature_id"]]
    row_of = {f: i for i, f in enumerate(feature_ids)}
    shard_plan = ShardPlan(feature_ids, args.batch, args.seed)
    manifest = Manifest.for_plan(
        shard_plan, f"synthetic:L={args.seq_len}:vocab={args.vocab}",
        {t: f"synthetic-teacher-{t}-seed{args.seed + 10 + k}" for k, t in enumerate(teacher_names)},
        dtype=args.logits_dtype)

    # The store: a fresh directory named by rank 0.
    holder = [None]
    if rank == 0:
        if args.store_dir is not None:
            args.store_dir.mkdir(parents=True, exist_ok=True)
        holder[0] = tempfile.mkdtemp(prefix="stream_overhead_", dir=args.store_dir)
        atexit.register(shutil.rmtree, holder[0], True)  # also when the run fails
    if world > 1:
        dist.broadcast_object_list(holder, src=0)
    store = Path(holder[0])

    # Teachers: frozen, the student's architecture (same backbone, as the role plan assumes).
    teachers = {t: qa_model(args, seed=args.seed + 10 + k).to(device).eval().requires_grad_(False)
                for k, t in enumerate(teacher_names)}

    def teacher_compute(model: torch.nn.Module) -> Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]:
        # as dist_xqa.roles.producer.teacher_compute, on an in-memory model
        def compute(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            rows = [row_of[int(f)] for f in ids]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                start, end = predict_logits(model, features, args.producer_batch, device, rows)
            return torch.from_numpy(start), torch.from_numpy(end)
        return compute

    producers = [Producer(store, p.teacher, shard_plan, teacher_compute(teachers[p.teacher]), args.lookahead, 1,
                          manifest=manifest, part=(p.ranks.index(rank), len(p.ranks)))
                 for p in plan.producers if rank in p.ranks]
    barrier()  # the manifest exists before any reader looks
    reader = StoreReader(store, teacher_names, shard_plan, manifest, stall_timeout_s=60.0, mode="window",
                         lookahead=args.lookahead, writer=group.rank == 0)

    engine = build_engine(qa_model(args, seed=args.seed + 1), load_ds_config(args.ds_config), group,
                          lr=1e-5, weight_decay=0.005, micro_batch_size=args.batch // world,
                          gradient_accumulation_steps=1)
    engine = TimedEngine(engine)

    options = kd_options(DistillConfig(aggregation=args.aggregation),
                         torch.full((args.teachers,), 1 / args.teachers) if args.aggregation == "hyper" else None)
    languages = sorted(set(features["context_lang"]))
    batches = ShardBatches(features, shard_plan, 0, group.rank, group.size, 1, languages)  # D is one epoch
    inputs = StudentInputs(lambda epoch: batches, reader, device, loader_workers(device))
    # the student's TensorBoard writes go into the temporary store directory
    monitor = Monitor(store, "student", enabled=group.rank == 0)
    imp = args.aggregation == "imp"
    train_step = StudentTrainStep(engine, inputs, options, StudentScalars(monitor, languages, teacher_names, imp),
                                  monitor, reader, Heartbeat(store / f"student.{rank}.heartbeat.json", "student"), [])
    inprocess_scalars = StudentScalars(Monitor(store, "inprocess", enabled=group.rank == 0), languages,
                                       teacher_names, imp)
    logs: dict[str, list[float]] = defaultdict(list)  # kept, as a plain fine-tuning loop logs them
    peak = {"scan_bytes": 0, "scan_shards": 0}

    def rows_at(index: int) -> list[int]:
        ids = shard_plan.features(shard_plan.shard_at(index))
        return [row_of[f] for f in ids[rank_rows(len(ids), group.rank, group.size)]]

    def plain_step(index: int) -> None:
        rows = rows_at(index)
        out = engine(**model_inputs(features, rows, device))
        mask, start_pos, end_pos = label_tensors(features, rows, device)
        loss = span_nll(out.start_logits.float(), out.end_logits.float(), mask, start_pos, end_pos)
        engine.backward(loss)
        engine.step()
        logs["plain_nll"].append(loss.item())

    def streamed_step(index: int) -> None:
        epoch, position = shard_plan.locate(index)
        train_step(epoch, position, LoopState(epoch=epoch, step_in_epoch=position, global_step=index))

    def inprocess_step(index: int) -> None:
        batch = batches[shard_plan.locate(index)[1]]
        micro = []
        for m in batch.micro:
            inputs = {k: v.to(device) for k, v in m.inputs.items()}
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                outs = [teachers[t](**inputs) for t in teacher_names]
            micro.append(m._replace(inputs=inputs, mask=m.mask.to(device), start=m.start.to(device),
                                    end=m.end.to(device), langs=m.langs.to(device),
                                    teacher_start=torch.stack([o.start_logits.float() for o in outs]),
                                    teacher_end=torch.stack([o.end_logits.float() for o in outs])))
        student_step(engine, batch._replace(micro=micro), options, inprocess_scalars)
        if inprocess_scalars.scalars.due(index):
            inprocess_scalars.scalars.flush(index)

    steps = {"plain": plain_step, "streamed": streamed_step, "inprocess": inprocess_step}
    produced: dict[str, list[tuple[int, float]]] = defaultdict(list)  # teacher -> (features, seconds) per shard

    def fill() -> None:
        """Producers fill the look-ahead window (untimed for the student), then the store is
        scanned: right after a fill is when it holds the most."""
        barrier()  # rank 0 has committed progress
        for producer in producers:
            while True:
                began = time.perf_counter()
                if not producer.step():
                    break
                produced[producer.teacher].append((args.batch, time.perf_counter() - began))
        barrier()  # every teacher's shards of the window are on disk
        used, shards = store_usage(store, teacher_names)
        if used > peak["scan_bytes"]:
            peak["scan_bytes"], peak["scan_shards"] = used, shards

    def timed_step(run: Callable[[int], None], index: int) -> float:
        barrier()
        sync(device)
        began = time.perf_counter()
        engine.seconds = 0.0
        run(index)
        sync(device)
        took = time.perf_counter() - began
        outside[variant_of[run]].append(took - engine.seconds)
        return took

    step_seconds: dict[str, list[float]] = defaultdict(list)  # variant -> seconds of each timed step
    outside: dict[str, list[float]] = defaultdict(list)  # variant -> seconds of each step outside the engine
    variant_of = {run: variant for variant, run in steps.items()}
    wait_before = 0.0
    for number, (indices, is_timed) in enumerate(segments(args.warmup, args.steps, args.lookahead)):
        fill()
        if is_timed and not step_seconds:  # measure the store from the first timed step on
            wait_before = inputs.wait_seconds
        for index in indices:  # the variants take turns, step by step, in a rotating order
            for variant in VARIANTS[index % 3:] + VARIANTS[:index % 3]:
                seconds = timed_step(steps[variant], index)
                if is_timed:
                    step_seconds[variant].append(seconds)
        if group.rank == 0:  # as at a checkpoint: shards behind the student may go
            reader.commit_progress(*shard_plan.locate(indices.stop))
        if rank == 0:
            kind = "timed" if is_timed else "warm-up"
            print(f"[stream_overhead] {kind} block of {len(indices)} step(s) per variant done", flush=True)
    if world > 1:  # a data-parallel step is as slow as its slowest rank
        for variant in VARIANTS:
            times = torch.tensor(step_seconds[variant], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group.process_group)
            step_seconds[variant] = times.tolist()

    wait_seconds = inputs.wait_seconds - wait_before  # the student's, not the read-ahead thread's
    inputs.close()
    release_engine(engine.engine)
    engine = None

    # Producer rates per teacher, per producer rank; each producer's first shard (one-time
    # costs: first forward, allocator, kernel selection) is left out when it wrote more.
    local = {t: (records[1:] if len(records) > 1 else records) for t, records in produced.items()}
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local, group=group.process_group)
    producer_report = {}
    for t in teacher_names:
        per_rank = [sum(f for f, _ in part[t]) / sum(s for _, s in part[t]) for part in gathered if part.get(t)]
        shards = sum(len(part.get(t, [])) for part in gathered)
        producer_report[t] = dict(samples_per_s=statistics.mean(per_rank) if per_rank else None,
                                  producer_ranks=len(per_rank), shards_timed=shards)

    if rank == 0:
        shutil.rmtree(store, ignore_errors=True)
    if world > 1:
        dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None

    global_batch = args.batch
    variants = {}
    for variant in VARIANTS:
        times = step_seconds[variant]
        variants[variant] = dict(samples_per_s=len(times) * global_batch / sum(times), timed_steps=len(times),
                                 seconds=sum(times), median_step_ms=1e3 * statistics.median(times),
                                 samples_per_s_from_median_step=global_batch / statistics.median(times),
                                 step_ms=[round(1e3 * t, 3) for t in times],
                                 # the timed steps are the last ones (after the warm-up)
                                 outside_engine_median_ms=1e3 * statistics.median(outside[variant][-len(times):]),
                                 outside_engine_mean_ms=1e3 * statistics.mean(outside[variant][-len(times):]))
    variants["streamed"]["inputs_wait_ms_per_step"] = 1e3 * wait_seconds / variants["streamed"]["timed_steps"]
    variants["streamed"]["wait_seconds"] = wait_seconds
    ratio = variants["streamed"]["samples_per_s"] / variants["plain"]["samples_per_s"]
    ratio_median = variants["plain"]["median_step_ms"] / variants["streamed"]["median_step_ms"]
    # step i of every variant trains on the same features at nearly the same moment: the
    # median of the paired ratios is the estimate least moved by a busy machine
    ratio_paired = statistics.median(p / s for p, s in zip(step_seconds["plain"], step_seconds["streamed"]))
    store_ms = variants["streamed"]["inputs_wait_ms_per_step"]

    bytes_per_value = torch.tensor([], dtype=LOGIT_DTYPES[args.logits_dtype]).element_size()
    per_shard_logit_bytes = global_batch * 2 * args.seq_len * bytes_per_value
    full = args.teachers * n_features * 2 * args.seq_len * bytes_per_value
    peak_bytes = peak["scan_bytes"]
    disk = dict(
        peak_bytes_on_disk=peak_bytes,  # shard files: logits + feature ids + safetensors header
        peak_shard_files=peak["scan_shards"],
        peak_logit_bytes=peak["scan_shards"] * per_shard_logit_bytes,
        window_logit_bytes=args.teachers * args.lookahead * per_shard_logit_bytes,
        full_precompute_bytes=full,
        features_in_D=n_features,
        bytes_per_value=bytes_per_value,
        peak_over_full=peak_bytes / full,
    )
    report = dict(
        benchmark="stream_overhead",
        device=torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        torch=torch.__version__, deepspeed=__import__("deepspeed").__version__,
        world_size=world, smoke=args.smoke, torch_threads=torch.get_num_threads(),
        config=dict(seq_len=args.seq_len, global_batch=global_batch, micro_batch_per_rank=global_batch // world,
                    timed_steps=args.steps, warmup_steps=args.warmup, teachers=args.teachers, hidden=args.hidden,
                    layers=args.layers, heads=args.heads, intermediate=args.intermediate, vocab=args.vocab,
                    lookahead=args.lookahead, producer_batch=args.producer_batch, logits_dtype=args.logits_dtype,
                    aggregation=args.aggregation, ds_config=str(args.ds_config.relative_to(ROOT)
                                                                 if args.ds_config.is_relative_to(ROOT) else args.ds_config),
                    kd_impl=kernels.select_impl(torch.empty(0, device=device)),
                    precision="bf16 (DeepSpeed auto)" if cuda else "fp32", store_mode="window"),
        variants=variants,
        ratio_streamed_over_plain=ratio,
        ratio_streamed_over_plain_from_median_step=ratio_median,
        ratio_streamed_over_plain_paired_median=ratio_paired,
        inputs_wait_ms_per_step_over_plain_median_step=store_ms / variants["plain"]["median_step_ms"],
        ratio_inprocess_over_plain=variants["inprocess"]["samples_per_s"] / variants["plain"]["samples_per_s"],
        target_ratio=TARGET_RATIO,
        meets_target=ratio >= TARGET_RATIO,
        producers=producer_report,
        disk=disk,
    )

    print()
    print(f"student, {world} rank(s), global batch {global_batch}, L = {args.seq_len}, K = {args.teachers}, "
          f"{report['device']}")
    print(f"{'variant':<10} {'samples/s':>10} {'vs plain':>9} {'median step ms':>15} {'steps':>6} {'seconds':>8}")
    for variant in VARIANTS:
        v = variants[variant]
        print(f"{variant:<10} {v['samples_per_s']:>10.2f} {v['samples_per_s'] / variants['plain']['samples_per_s']:>9.3f} "
              f"{v['median_step_ms']:>15.1f} {v['timed_steps']:>6} {v['seconds']:>8.2f}")
    print(f"streamed / plain = {ratio:.3f} (from median steps {ratio_median:.3f}, median of paired steps "
          f"{ratio_paired:.3f}; "
          f"target >= {TARGET_RATIO}); waiting for inputs {variants['streamed']['inputs_wait_ms_per_step']:.1f} ms/step, "
          f"waited {wait_seconds:.2f} s")
    for t, p in producer_report.items():
        rate = "n/a" if p["samples_per_s"] is None else f"{p['samples_per_s']:.2f}"
        print(f"producer {t}: {rate} samples/s per producer rank ({p['shards_timed']} shards timed)")
    print(f"logit store: peak {peak_bytes / 2**20:.2f} MiB on disk ({peak['scan_shards']} shard files) vs "
          f"full precompute {full / 2**20:.2f} MiB (K x |D| x 2 x L x {bytes_per_value} B, |D| = {n_features})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("host ms per step (outside the engine; median, mean): " + ", ".join(
        f"{v} {variants[v]['outside_engine_median_ms']:.1f}, {variants[v]['outside_engine_mean_ms']:.1f}"
        for v in VARIANTS))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
