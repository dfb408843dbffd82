"""Batched forward passes of a QA model over stored features: the one place where
features become model inputs (and span labels), shared by training, logit producers and
evaluation."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from dist_xqa.monitor import progress

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LABELS = ("answer_mask", "start_positions", "end_positions")


def input_columns(features) -> list[str]:
    return [c for c in MODEL_INPUTS if c in features.column_names]


def model_inputs(features, rows: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for the given feature rows, as tensors on `device`."""
    batch = features.select_columns(input_columns(features))[list(rows)] if len(rows) else {}
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.long, device=device) for k, v in batch.items()}


def label_tensors(features, rows: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(mask [B, L] bool, start [B], end [B]) for feature rows."""
    cols = features.select_columns(list(LABELS))[rows]
    mask = torch.as_tensor(np.asarray(cols["answer_mask"]), device=device).bool()
    return (mask, torch.as_tensor(cols["start_positions"], device=device),
            torch.as_tensor(cols["end_positions"], device=device))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, features, batch_size: int, device: torch.device,
                   rows: Sequence[int] | None = None, desc: str | None = None,
                   after_batch: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits [N, L] (float32) for `rows` of `features` (default: all).
    `after_batch` is called after every batch (a long evaluation's stop check)."""
    rows = list(range(len(features))) if rows is None else list(rows)
    was_training = model.training
    model.eval()
    starts, ends = [], []
    batches = range(0, len(rows), batch_size)
    with progress(len(batches), desc or "", enabled=desc is not None, unit="batch") as bar:
        for i in batches:
            out = model(**model_inputs(features, rows[i:i + batch_size], device))
            starts.append(out.start_logits.float().cpu().numpy())
            ends.append(out.end_logits.float().cpu().numpy())
            bar.update(1)
            if after_batch is not None:
                after_batch()
    model.train(was_training)
    if not starts:
        width = len(features[0]["input_ids"]) if len(features) else 0
        return np.zeros((0, width), np.float32), np.zeros((0, width), np.float32)
    return np.concatenate(starts), np.concatenate(ends)
