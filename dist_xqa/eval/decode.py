"""n-best span decoding of start/end scores back to answer texts.

The conventions of Hugging Face's `run_qa.py` post-processing: a span (s, e) of one
window scores start[s] + end[e]; candidates are the n_best highest starts x the n_best
highest ends; the answer of an example is its best span over all its windows. One change:
candidates are drawn among context positions only, so a window whose highest scores sit on
question, special or padding tokens still yields its best context span.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dist_xqa.data.records import QAExample
from dist_xqa.eval.report import Key


def postprocess(
    features: Any,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    examples: Sequence[QAExample],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[Key, str]:
    """Answer text per example key, decoded from per-feature start/end scores.

    `features` is a `datasets.Dataset` (or any mapping from column name to a per-feature
    sequence) with columns feature_id, example_id, question_lang, context_lang and
    offsets (per token [start, end] character offsets into the context; [-1, -1] for
    tokens outside it). `start_logits` / `end_logits` are [N, L] arrays, row i for
    feature i. A span must have end >= start, at most `max_answer_length` tokens and both
    ends on context tokens; CLS (no answer) is never predicted, as SQuAD v1.1 has none.
    Its text is context[offsets[start][0]:offsets[end][1]]. An example whose windows hold
    no admissible span gets "", examples without features get no entry.

    The scores may be logits or log-probabilities, with the same code: a span's score is
    start[s] + end[e] either way. With log-probabilities that sum is log(p_start * p_end),
    and the log is monotone, so the highest sum is the most probable span; with logits it
    differs from the log-probability sum only by the window's log-normalisers, a constant
    within a window (the HF convention compares raw logit sums across windows, log-
    probabilities compare normalised ones). A position at -inf (masked, or probability
    zero) is skipped, so a -inf score is never an answer.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if start_logits.ndim != 2 or start_logits.shape != end_logits.shape:
        raise ValueError(
            f"start and end scores must be [N, L] arrays of one shape, got "
            f"{start_logits.shape} and {end_logits.shape}"
        )
    columns = {name: list(features[name]) for name in
               ("feature_id", "example_id", "question_lang", "context_lang", "offsets")}
    if len(columns["feature_id"]) != start_logits.shape[0]:
        raise ValueError(
            f"{len(columns['feature_id'])} features but {start_logits.shape[0]} rows of scores"
        )
    contexts = {example.key: example.context for example in examples}
    best: dict[Key, tuple[float, str]] = {}
    for row, feature_id in enumerate(columns["feature_id"]):
        key = (columns["example_id"][row], columns["question_lang"][row], columns["context_lang"][row])
        if key not in contexts:
            raise ValueError(f"feature {feature_id} refers to example {key}, which is not in the examples")
        span = _best_span(
            feature_id, columns["offsets"][row], start_logits[row], end_logits[row], n_best, max_answer_length
        )
        if span is None:
            best.setdefault(key, (-np.inf, ""))
            continue
        span_score, char_start, char_end = span
        if char_end > len(contexts[key]):
            raise ValueError(
                f"feature {feature_id}: offset {char_end} is past the end of the context of "
                f"example {key} ({len(contexts[key])} characters); features and examples disagree"
            )
        if key not in best or span_score > best[key][0]:
            best[key] = (span_score, contexts[key][char_start:char_end])
    return {key: text for key, (_, text) in best.items()}


def _best_span(
    feature_id: int,
    offsets: Sequence[Sequence[int]],
    start: np.ndarray,
    end: np.ndarray,
    n_best: int,
    max_answer_length: int,
) -> tuple[float, int, int] | None:
    """(score, character start, character end) of the best admissible span of one window,
    or None when it has none."""
    start, end = start.astype(np.float64), end.astype(np.float64)
    if np.isnan(start).any() or np.isnan(end).any():
        raise ValueError(f"feature {feature_id}: start/end scores contain NaN")
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(offsets) > len(start):
        raise ValueError(
            f"feature {feature_id}: {len(offsets)} token offsets but only {len(start)} scores"
        )
    # Tokens past the offsets (an unpadded window in padded scores) are outside the context.
    in_context = np.zeros(len(start), dtype=bool)
    in_context[: len(offsets)] = (offsets[:, 0] >= 0) & (offsets[:, 1] >= 0)
    starts = _top_positions(start, in_context, n_best)
    ends = _top_positions(end, in_context, n_best)
    length = ends[None, :] - starts[:, None] + 1
    scores = np.where(
        (length >= 1) & (length <= max_answer_length),
        start[starts][:, None] + end[ends][None, :],
        -np.inf,
    )
    if scores.size == 0 or not np.isfinite(scores.max()):
        return None
    i, j = np.unravel_index(np.argmax(scores), scores.shape)
    return float(scores[i, j]), int(offsets[starts[i], 0]), int(offsets[ends[j], 1])


def _top_positions(scores: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest finite scores among the allowed positions, best first."""
    candidates = np.flatnonzero(allowed & np.isfinite(scores))
    return candidates[np.argsort(-scores[candidates], kind="stable")[:n]]
