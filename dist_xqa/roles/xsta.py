"""Strategy xsta: X-STA training (Cao et al. 2023) on (source, target) window pairs.

Training data are the translate-train features (`TRAIN_SET`: every language with question
and passage in it). A pair is the source-language example of an id with its version in a
target language T, for every training language T, the source's own included (S = T pairs
are part of training, as in the paper). Windows are paired by index within an id (see
`pair_windows`). Each optimizer step takes a global batch of pairs from a seeded
permutation of all pairs, so batches mix languages (the public code's one language per
batch, with the same order every epoch, is not copied).

The engine trains `XstaModule`: the Hugging Face QA model with the sharing layer wrapped
around one of its layers (XstaEncoder) and the calibration head. After each epoch that
improves the dev F1 of p_T (encoder + QA head on the target alone, which is what
`pipeline("question-answering")` computes) the QA model is saved in Hugging Face format in
<run>/student, with X-STA's own modules beside it (xsta.safetensors, xsta.json):
`dist_xqa.strategies.xsta_model.load_xsta(<run>/student)` loads the whole model for translate-test
prediction (`XstaModule.predict`).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from dist_xqa.config import RunConfig, batch_for_group
from dist_xqa.distributed import TrainingGroup, build_engine, release_engine
from dist_xqa.inference import label_tensors, model_inputs
from dist_xqa.jobs import STUDENT_SETS, dev_set
from dist_xqa.layout import STUDENT, RunLayout
from dist_xqa.models import build_model, save_hf
from dist_xqa.monitor import DeviceScalars, Monitor
from dist_xqa.prepared import Prepared
from dist_xqa.roles.loop import GroupLoop, LoopState, epoch_order, full_state_dict, rank_slice
from dist_xqa.plan import RolePlan
from dist_xqa.roles.selection import dev_f1, write_done
from dist_xqa.strategies.xsta_model import Key, XstaModule, save_extras

log = logging.getLogger(__name__)
TRAIN_SET = STUDENT_SETS["xsta"]  # every language with question and passage in it
DEV_SET = dev_set(TRAIN_SET)


def pair_windows(keys: Sequence[Key], windows: Sequence[int], source_lang: str) -> list[tuple[int, int]]:
    """(source row, target row) pairs of feature rows, for every id that has its source
    version and every language T that has the id (T = source included).

    Windows pair by index. When the two versions split into different numbers of windows,
    the longer side's extra windows pair with the shorter side's last window: every window
    of both sides is trained on, and the shorter side's last window repeats. Its labels
    are its own (CLS when its window lacks the answer), so the pair still teaches each side
    its own span.
    """
    by_version: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for row, ((example_id, q, p), window) in enumerate(zip(keys, windows)):
        if q == p:
            by_version[(example_id, p)][int(window)] = row
    pairs = []
    for (example_id, lang), target in sorted(by_version.items()):
        source = by_version.get((example_id, source_lang))
        if source is None:
            continue
        src_rows, tgt_rows = [source[w] for w in sorted(source)], [target[w] for w in sorted(target)]
        for i in range(max(len(src_rows), len(tgt_rows))):
            pairs.append((src_rows[min(i, len(src_rows) - 1)], tgt_rows[min(i, len(tgt_rows) - 1)]))
    return pairs


def run_xsta(cfg: RunConfig, prepared: Prepared, ds_config: dict, plan: RolePlan,
             groups: dict[str, TrainingGroup], device: torch.device) -> None:
    """Train X-STA on the student group (every rank of it calls this)."""
    layout = RunLayout(cfg.run_path)
    out_dir = layout.student
    if layout.done(out_dir).exists():
        return
    group = groups[plan.student.name]
    scfg, x = batch_for_group(cfg.student, group.size), cfg.strategy.xsta
    tokenizer = prepared.tokenizer()
    features = prepared.features(TRAIN_SET)
    dev_features, dev_examples = prepared.features(DEV_SET), prepared.examples(DEV_SET)
    cols = features.select_columns(["example_id", "question_lang", "context_lang", "window"])[:]
    keys = list(zip(cols["example_id"], cols["question_lang"], cols["context_lang"]))
    source_lang = x.source_lang or cfg.data.source_lang
    pairs = pair_windows(keys, cols["window"], source_lang)
    same = [keys[s][2] == keys[t][2] for s, t in pairs]
    # the example each pair is a view of: a batch may hold several (one per target language)
    codes = {example_id: i for i, example_id in enumerate(dict.fromkeys(key[0] for key in keys))}
    example_of = [codes[keys[s][0]] for s, _ in pairs]
    if group.rank == 0:
        log.info("xsta: %d (source, target) window pairs, %d with the source's own language", len(pairs), sum(same))
    global_batch = scfg.micro_batch_size * scfg.grad_accum * group.size
    steps = math.ceil(len(pairs) / global_batch)
    module = XstaModule(build_model(cfg.model, tokenizer, seed=cfg.seed + 1), x)
    engine = build_engine(module, ds_config, group, lr=scfg.lr, weight_decay=scfg.weight_decay,
                          micro_batch_size=scfg.micro_batch_size, gradient_accumulation_steps=scfg.grad_accum,
                          total_steps=steps * scfg.epochs, warmup_ratio=scfg.warmup_ratio)
    monitor = Monitor(cfg.run_path, STUDENT, enabled=group.rank == 0, every=cfg.monitor.every)
    scalars = DeviceScalars(monitor)  # read once per flush, not per step

    def train_step(epoch: int, i: int, state: LoopState) -> None:
        order = epoch_order(len(pairs), cfg.seed, epoch)
        batch = [int(p) for p in order.take(range(i * global_batch, (i + 1) * global_batch), mode="wrap")]
        mine = rank_slice(batch, group)
        for micro in np.array_split(np.asarray(mine), scfg.grad_accum):
            # the batch wraps around the pairs, so every rank's micro-batches are full
            src_rows, tgt_rows = [pairs[p][0] for p in micro], [pairs[p][1] for p in micro]
            loss = engine(model_inputs(features, src_rows, device), model_inputs(features, tgt_rows, device),
                          torch.tensor([same[p] for p in micro], device=device),
                          label_tensors(features, src_rows, device), label_tensors(features, tgt_rows, device),
                          torch.tensor([example_of[p] for p in micro], device=device))
            engine.backward(loss.total)
            engine.step()
            for name, value in loss._asdict().items():
                scalars.add(f"student/loss/{name}", value)
        if scalars.due(state.global_step):
            scalars.flush(state.global_step)
            monitor.scalar("student/lr", engine.get_lr()[0], state.global_step)
        monitor.throughput(len(batch), state.global_step)

    def end_of_epoch(epoch: int, state: LoopState) -> None:
        # Model selection on p_T: the QA model alone on the dev set's examples.
        scalars.flush(state.global_step)
        qa = engine.module.encoder.qa
        select = cfg.eval.select_on_dev and len(dev_features) > 0
        f1 = dev_f1(qa, dev_features, dev_examples, cfg, device, group) if select else -1.0
        if select:
            monitor.scalar("student/dev_f1", f1, state.global_step)
        if f1 > state.best_metric or not select:
            state.best_metric, state.best_epoch = f1, epoch
            whole = full_state_dict(engine)
            weights = {k.removeprefix("encoder.qa."): v for k, v in whole.items() if k.startswith("encoder.qa.")}
            if group.rank == 0:
                save_hf(qa, tokenizer, out_dir, state_dict=weights)
                save_extras(engine.module, out_dir, whole)

    loop = GroupLoop(engine, group, layout.checkpoints(STUDENT), cfg.checkpoint,
                     desc="student (xsta)", show_progress=group.rank == 0)
    state = loop.run(scfg.epochs, lambda epoch: steps, train_step, end_of_epoch)
    if group.rank == 0:
        write_done(out_dir, cfg, state, scfg.epochs, len(dev_features))
    dist.barrier(group=group.process_group)
    monitor.close()
    release_engine(engine)
