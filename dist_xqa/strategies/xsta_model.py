"""The X-STA model as trained, saved and loaded: `XstaModule` (the Hugging Face QA model
with the knowledge-sharing layer wrapped around one of its layers, and the calibration
head), its files beside a saved QA model (`save_extras`, `load_xsta`), and translate-test
inference over test features (`translate_test_scores`). Training is dist_xqa.roles.xsta;
the losses and modules are dist_xqa.strategies.xsta.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dist_xqa.config import XstaConfig
from dist_xqa.inference import label_tensors, model_inputs, predict_logits
from dist_xqa.models import load_trained
from dist_xqa.strategies.xsta import (Span, TeacherGuidedCalibration, XstaEncoder, XstaLoss, calibrated_scores,
                                      xsta_loss)

EXTRAS_WEIGHTS, EXTRAS_CONFIG = "xsta.safetensors", "xsta.json"
# The QA model's weights in XstaModule's state: the rest (sharing, calibration) is X-STA's own.
# encoder.sharing.layer is the QA model's own layer under a second name.
QA_PREFIXES = ("encoder.qa.", "encoder.sharing.layer.")
Key = tuple[str, str, str]


def is_xsta(model_dir: Path) -> bool:
    """A model saved by strategy xsta: its sharing and calibration modules lie beside it."""
    return (Path(model_dir) / EXTRAS_CONFIG).exists()


class XstaModule(nn.Module):
    """What the engine trains: the QA model with knowledge sharing, plus calibration."""

    def __init__(self, qa: nn.Module, x: XstaConfig):
        super().__init__()
        self.encoder = XstaEncoder(qa, x.share_layer, x.lambda0, x.mix_on, x.gdks, alignment_layer=x.alignment_layer)
        config = qa.config
        self.calibration = TeacherGuidedCalibration(config.hidden_size, config.num_attention_heads,
                                                    config.attention_probs_dropout_prob, x.norm_eps, x.normalize,
                                                    norm_stats=x.norm_stats)
        self.x = x

    def forward(self, src: dict, tgt: dict, same_language: torch.Tensor, src_labels: tuple,
                tgt_labels: tuple, examples: torch.Tensor | None = None) -> XstaLoss:
        """The X-STA loss of a batch of pairs; labels are (positions mask, start, end);
        `examples` [B]: the example each pair is a view of (InfoNCE's negatives are other
        examples only)."""
        out = self.encoder(src, tgt, same_language)
        src_tokens, tgt_tokens = src["attention_mask"].bool(), tgt["attention_mask"].bool()
        calibrated = None
        if self.x.gamma:
            calibrated = self.calibration(out.h_tgt, out.h_src, tgt_tokens, src_tokens, tgt_labels[0],
                                          src_labels[0], out.src_start, out.src_end)
        return xsta_loss(Span(out.src_start.float(), out.src_end.float(), src_labels[0], src_tokens,
                              src_labels[1], src_labels[2], out.h_src, out.align_src),
                         Span(out.tgt_start.float(), out.tgt_end.float(), tgt_labels[0], tgt_tokens,
                              tgt_labels[1], tgt_labels[2], out.h_tgt, out.align_tgt), calibrated,
                         alpha=self.x.alpha, gamma=self.x.gamma, sentence_weight=self.x.sentence_weight,
                         token_weight=self.x.token_weight, infonce_tau=self.x.infonce_tau,
                         alignment=self.x.alignment, groups=examples)

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
