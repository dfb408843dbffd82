"""Model selection on dev and the record of the selected model, shared by every role that
trains a model (teachers and baselines, the LBMRC, SKD and X-STA students).

At each epoch end a role scores its model on its dev set (`dev_f1`) and keeps the best
epoch's weights in Hugging Face format (`select_and_save`); without a dev set, the last
epoch's. When the role has finished, `write_done` writes <model dir>/DONE.json: which
epoch was selected and on what grounds. A model directory with DONE.json is finished:
later stages wait for it and a rerun does not train it again.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from dist_xqa.config import RunConfig
from dist_xqa.eval.decode import postprocess
from dist_xqa.eval.report import score
from dist_xqa.files import write_json
from dist_xqa.layout import RunLayout
from dist_xqa.models import save_hf
from dist_xqa.monitor import Monitor
from dist_xqa.roles.loop import LoopState, full_state_dict, group_predict

log = logging.getLogger(__name__)


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
    write_json(RunLayout.done(out_dir), {"selected_epoch": state.best_epoch + 1, "dev_f1": state.best_metric,
                                       "selection": selection, "epochs": epochs})
