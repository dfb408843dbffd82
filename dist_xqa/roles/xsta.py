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
`dist_xqa.roles.xsta.load_xsta(<run>/student)` loads the whole model for translate-test
prediction (`XstaModule.predict`).
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from dist_xqa.config import RunConfig, XstaConfig, batch_for_group
from dist_xqa.distributed import TrainingGroup, build_engine, release_engine
from dist_xqa.inference import label_tensors, model_inputs, predict_logits
from dist_xqa.models import build_model, load_trained, save_hf
from dist_xqa.monitor import DeviceScalars, Monitor
from dist_xqa.prepare import Prepared
from dist_xqa.roles.loop import GroupLoop, LoopState, epoch_order, full_state_dict, rank_slice
from dist_xqa.roles.plan import RolePlan
from dist_xqa.roles.selection import dev_f1, write_done
from dist_xqa.strategies.xsta import (Span, TeacherGuidedCalibration, XstaEncoder, XstaLoss, calibrated_scores,
                                      xsta_loss)

log = logging.getLogger(__name__)
EXTRAS_WEIGHTS, EXTRAS_CONFIG = "xsta.safetensors", "xsta.json"
# The QA model's weights in XstaModule's state: the rest (sharing, calibration) is X-STA's own.
# encoder.sharing.layer is the QA model's own layer under a second name.
QA_PREFIXES = ("encoder.qa.", "encoder.sharing.layer.")
TRAIN_SET = "tt_union"  # every language with question and passage in it
DEV_SET = "tt_union.dev"
Key = tuple[str, str, str]


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


class XstaModule(nn.Module):
    """What the engine trains: the QA model with knowledge sharing, plus calibration."""

    def __init__(self, qa: nn.Module, x: XstaConfig):
        super().__init__()
        self.encoder = XstaEncoder(qa, x.share_layer, x.lambda0, x.mix_on, x.gdks)
        config = qa.config
        self.calibration = TeacherGuidedCalibration(config.hidden_size, config.num_attention_heads,
                                                    config.attention_probs_dropout_prob, x.norm_eps, x.normalize)
        self.x = x

    def forward(self, src: dict, tgt: dict, same_language: torch.Tensor, src_labels: tuple,
                tgt_labels: tuple) -> XstaLoss:
        """The X-STA loss of a batch of pairs; labels are (positions mask, start, end)."""
        out = self.encoder(src, tgt, same_language)
        src_tokens, tgt_tokens = src["attention_mask"].bool(), tgt["attention_mask"].bool()
        calibrated = None
        if self.x.gamma:
            calibrated = self.calibration(out.h_tgt, out.h_src, tgt_tokens, src_tokens, tgt_labels[0],
                                          src_labels[0], out.src_start, out.src_end)
        return xsta_loss(Span(out.src_start.float(), out.src_end.float(), src_labels[0], src_tokens,
                              src_labels[1], src_labels[2], out.h_src),
                         Span(out.tgt_start.float(), out.tgt_end.float(), tgt_labels[0], tgt_tokens,
                              tgt_labels[1], tgt_labels[2], out.h_tgt), calibrated,
                         alpha=self.x.alpha, gamma=self.x.gamma, sentence_weight=self.x.sentence_weight,
                         token_weight=self.x.token_weight, infonce_tau=self.x.infonce_tau,
                         alignment=self.x.alignment)

    @torch.no_grad()
    def predict(self, src: dict, tgt: dict, same_language: torch.Tensor, src_positions: torch.Tensor,
                tgt_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end scores of the target side when its source-language version is given
        (translate-test): log p~_T = log((p_T|S + p_T) / 2) with `calibrate_at_inference`,
        else the target's own logits (p_T). Span decoding adds start and end scores either way."""
        out = self.encoder(src, tgt, same_language)
        if not self.x.calibrate_at_inference:
            return out.tgt_start, out.tgt_end
        p_start, p_end = self.calibration(out.h_tgt, out.h_src, tgt["attention_mask"].bool(),
                                          src["attention_mask"].bool(), tgt_positions, src_positions,
                                          out.src_start, out.src_end)
        return (calibrated_scores(out.tgt_start, p_start, tgt_positions),
                calibrated_scores(out.tgt_end, p_end, tgt_positions))


def save_extras(module: XstaModule, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Writes X-STA's own modules next to a saved QA model: `xsta.safetensors` (sharing layer
    and calibration head, running statistics included; not the QA model's weights) and
    `xsta.json` (the strategy.xsta settings, share_layer resolved). `state_dict`: the whole
    module's weights (gathered from ZeRO-3 partitions), default the module's own."""
    state = module.state_dict() if state_dict is None else state_dict
    extras = {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith(QA_PREFIXES)}
    save_file(extras, directory / EXTRAS_WEIGHTS)
    settings = {**asdict(module.x), "share_layer": module.encoder.share_index + 1}
    (directory / EXTRAS_CONFIG).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def load_xsta(directory: str | Path) -> XstaModule:
    """The X-STA model saved by strategy xsta in `directory` (the student's output folder):
    the Hugging Face QA model with the sharing layer and calibration head restored, ready
    for `predict` (translate-test: p~_T). `AutoModelForQuestionAnswering` on the same folder
    gives the QA model alone (p_T)."""
    directory = Path(directory)
    x = XstaConfig(**json.loads((directory / EXTRAS_CONFIG).read_text()))
    module = XstaModule(load_trained(directory), x)
    missing, unexpected = module.load_state_dict(load_file(directory / EXTRAS_WEIGHTS), strict=False)
    lacking = [k for k in missing if not k.startswith(QA_PREFIXES)]
    if lacking or unexpected:
        raise ValueError(f"{directory / EXTRAS_WEIGHTS} does not fit strategy.xsta's modules: "
                         f"missing {lacking[:5]}, unexpected {unexpected[:5]}")
    return module.eval()


def translate_test_scores(module: XstaModule, features, source_lang: str, batch_size: int,
                          device: torch.device) -> tuple[np.ndarray, np.ndarray, set[Key]]:
    """Start and end scores [N, L] of every test feature, for span decoding, and the test
    examples (id, question language, passage language) scored with their source-language
    version.

    Translate-test: feature (id, q, p) window w reads the source-language version of its id
    (q = p = source, the parallel test file of the source language: an oracle translation)
    at window min(w, last window), and scores with XstaModule.predict (p~_T = (p_T|S + p_T)
    / 2 unless calibrate_at_inference is false). A feature whose id has no source version is
    scored by the QA model alone (p_T)."""
    cols = features.select_columns(["example_id", "question_lang", "context_lang", "window"])[:]
    keys = list(zip(cols["example_id"], cols["question_lang"], cols["context_lang"]))
    source_windows: dict[str, dict[int, int]] = defaultdict(dict)
    for row, ((example_id, q, p), window) in enumerate(zip(keys, cols["window"])):
        if q == p == source_lang:
            source_windows[example_id][int(window)] = row
    source_of = {}
    for row, ((example_id, _, _), window) in enumerate(zip(keys, cols["window"])):
        if windows := source_windows.get(example_id):
            source_of[row] = windows[min(int(window), max(windows))]
    length = len(features[0]["input_ids"]) if len(features) else 0
    start, end = np.zeros((len(features), length), np.float32), np.zeros((len(features), length), np.float32)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        paired = sorted(source_of)
        for i in range(0, len(paired), batch_size):
            rows = paired[i:i + batch_size]
            src_rows = [source_of[r] for r in rows]
            same = torch.tensor([keys[r][1] == keys[r][2] == source_lang for r in rows], device=device)
            scores = module.predict(model_inputs(features, src_rows, device), model_inputs(features, rows, device),
                                    same, label_tensors(features, src_rows, device)[0],
                                    label_tensors(features, rows, device)[0])
            start[rows], end[rows] = (x.float().cpu().numpy() for x in scores)
        alone = [r for r in range(len(features)) if r not in source_of]
        if alone:
            start[alone], end[alone] = predict_logits(module.encoder.qa, features, batch_size, device, alone)
    module.train(was_training)
    return start, end, {keys[r] for r in source_of}


def run_xsta(cfg: RunConfig, prepared: Prepared, ds_config: dict, plan: RolePlan,
             groups: dict[str, TrainingGroup], device: torch.device) -> None:
    """Train X-STA on the student group (every rank of it calls this)."""
    out_dir = cfg.run_path / "student"
    if (out_dir / "DONE.json").exists():
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
    if group.rank == 0:
        log.info("xsta: %d (source, target) window pairs, %d with the source's own language", len(pairs), sum(same))
    global_batch = scfg.micro_batch_size * scfg.grad_accum * group.size
    steps = math.ceil(len(pairs) / global_batch)
    module = XstaModule(build_model(cfg.model, tokenizer, seed=cfg.seed + 1), x)
    engine = build_engine(module, ds_config, group, lr=scfg.lr, weight_decay=scfg.weight_decay,
                          micro_batch_size=scfg.micro_batch_size, gradient_accumulation_steps=scfg.grad_accum,
                          total_steps=steps * scfg.epochs, warmup_ratio=scfg.warmup_ratio)
    monitor = Monitor(cfg.run_path, "student", enabled=group.rank == 0, every=cfg.monitor.every)
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
                          label_tensors(features, src_rows, device), label_tensors(features, tgt_rows, device))
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

    loop = GroupLoop(engine, group, cfg.run_path / "checkpoints" / "student", cfg.checkpoint,
                     desc="student (xsta)", show_progress=group.rank == 0)
    state = loop.run(scfg.epochs, lambda epoch: steps, train_step, end_of_epoch)
    if group.rank == 0:
        write_done(out_dir, cfg, state, scfg.epochs, len(dev_features))
    dist.barrier(group=group.process_group)
    monitor.close()
    release_engine(engine)
