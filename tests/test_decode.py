"""Span decoding on crafted scores: windows merged per example, spans confined to the
context, length limits, n-best candidates and log-probabilities with -inf."""
from __future__ import annotations

import re

import datasets
import numpy as np
import pytest

from dist_xqa.data.records import Answer, QAExample
from dist_xqa.eval.decode import postprocess

CONTEXT = "red green blue pink gray teal"
WORD_OFFSETS = [[m.start(), m.end()] for m in re.finditer(r"\S+", CONTEXT)]
OUTSIDE = [-1, -1]
LENGTH = 8  # [CLS] question [SEP] four context words [SEP]
FIRST_CONTEXT = 3  # position of the first context token in every window
LOW = -10.0  # score of every position a test does not set


def example(example_id: str = "q1", question_lang: str = "en", context_lang: str = "en") -> QAExample:
    return QAExample(example_id, "Which colour?", CONTEXT, (Answer("red", 0),), question_lang, context_lang)


def window_offsets(first_word: int) -> list[list[int]]:
    """Offsets of a window holding context words first_word .. first_word + 3."""
    return [OUTSIDE, OUTSIDE, OUTSIDE, *WORD_OFFSETS[first_word : first_word + 4], OUTSIDE]


def features(*windows: tuple[int, QAExample]) -> dict[str, list]:
    """Feature columns, one feature per (first context word, example)."""
    return {
        "feature_id": [100 + i for i in range(len(windows))],
        "example_id": [ex.id for _, ex in windows],
        "question_lang": [ex.question_lang for _, ex in windows],
        "context_lang": [ex.context_lang for _, ex in windows],
        "window": list(range(len(windows))),
        "offsets": [window_offsets(first) for first, _ in windows],
    }


def scores(*rows: dict[int, float]) -> np.ndarray:
    """[N, LENGTH] scores at LOW except the given {position: score} of each row."""
    out = np.full((len(rows), LENGTH), LOW)
    for i, row in enumerate(rows):
        for position, value in row.items():
            out[i, position] = value
    return out


def decode_one(start: dict[int, float], end: dict[int, float], **kwargs) -> str:
    ex = example()
    return postprocess(features((0, ex)), scores(start), scores(end), [ex], **kwargs)[ex.key]


def test_best_span_over_windows_is_merged_per_example():
    ex = example()
    feats = features((0, ex), (2, ex))  # red green blue pink | blue pink gray teal
    # window 0: "green" scores 3 + 3; window 1: "gray teal" scores 5 + 5
    start = scores({4: 3.0}, {5: 5.0})
    end = scores({4: 3.0}, {6: 5.0})
    assert postprocess(feats, start, end, [ex]) == {ex.key: "gray teal"}
    assert postprocess(feats, start * [[3.0], [1.0]], end * [[3.0], [1.0]], [ex]) == {ex.key: "green"}


def test_examples_are_kept_apart_by_language_pair():
    en, es = example(), example(question_lang="es")
    feats = features((0, en), (0, es))
    start = scores({3: 1.0}, {5: 1.0})
    end = scores({3: 1.0}, {6: 1.0})
    assert postprocess(feats, start, end, [en, es]) == {en.key: "red", es.key: "blue pink"}


def test_positions_outside_the_context_are_never_chosen():
    # CLS, the question token, both separators and the end on the last [SEP] score highest.
    start = {0: 100.0, 1: 50.0, 2: 50.0, 6: 5.0}
    end = {0: 100.0, 1: 50.0, 7: 100.0, 6: 1.0}
    assert decode_one(start, end) == "pink"


def test_end_before_start_is_not_a_span():
    # (pink, red) scores 20 but ends before it starts; (green, blue) is the best real span.
    start = {6: 10.0, 4: 2.0}
    end = {3: 10.0, 5: 1.0}
    assert decode_one(start, end) == "green blue"


def test_max_answer_length_counts_tokens():
    start = {3: 5.0, 4: 1.0}
    end = {6: 5.0, 4: 2.0}
    assert decode_one(start, end, max_answer_length=4) == "red green blue pink"
    assert decode_one(start, end, max_answer_length=3) == "red green"
    assert decode_one(start, end, max_answer_length=1) == "green"


def test_candidates_are_the_n_best_starts_and_ends():
    start = {6: 9.0, 3: 5.0}
    end = {3: 9.0, 6: 5.0}
    # n_best=1 pairs the top start (pink) with the top end (red): no span, empty answer.
    assert decode_one(start, end, n_best=1) == ""
    # (red, red) 14 and (pink, pink) 14 tie; the higher-ranked start wins.
    assert decode_one(start, end, n_best=2) == "pink"


def test_log_probabilities_with_masked_positions():
    ex = example()
    feats = features((0, ex))
    logits_start = scores({3: 1.0, 4: 2.5, 5: 0.5, 0: 9.0})
    logits_end = scores({4: 0.5, 5: 2.0, 6: 1.0, 7: 9.0})
    in_context = np.zeros(LENGTH, dtype=bool)
    in_context[FIRST_CONTEXT : FIRST_CONTEXT + 4] = True

    def log_softmax(logits: np.ndarray) -> np.ndarray:
        masked = np.where(in_context, logits, -np.inf)
        return masked - np.log(np.exp(masked - masked.max()).sum()) - masked.max()

    from_logits = postprocess(feats, logits_start, logits_end, [ex])
    from_log_probs = postprocess(feats, log_softmax(logits_start), log_softmax(logits_end), [ex])
    assert from_logits == from_log_probs == {ex.key: "green blue"}


def test_minus_infinity_positions_are_skipped():
    inf = -np.inf
    ex = example()
    feats = features((0, ex))
    start = np.full((1, LENGTH), inf)
    end = np.full((1, LENGTH), inf)
    start[0, 5], end[0, 4] = 0.0, 0.0  # the only finite pair ends before it starts
    assert postprocess(feats, start, end, [ex]) == {ex.key: ""}
    end[0, 6] = -3.0
    assert postprocess(feats, start, end, [ex]) == {ex.key: "blue pink"}


def test_window_without_a_span_does_not_hide_another_window():
    ex = example()
    feats = features((0, ex), (2, ex))
    start = np.full((2, LENGTH), -np.inf)
    end = np.full((2, LENGTH), -np.inf)
    start[1, 6], end[1, 6] = -50.0, -50.0  # window 1: "teal", a poor but finite span
    assert postprocess(feats, start, end, [ex]) == {ex.key: "teal"}


def test_unpadded_offsets_leave_the_tail_outside_the_context():
    ex = example()
    feats = features((0, ex))
    feats["offsets"] = [window_offsets(0)[:5]]  # context tokens red, green only
    start = scores({3: 1.0, 6: 50.0})
    end = scores({4: 1.0, 6: 50.0})
    assert postprocess(feats, start, end, [ex]) == {ex.key: "red green"}


def test_datasets_features_and_half_precision_scores():
    ex = example()
    columns = features((0, ex), (2, ex))
    start = scores({4: 3.0}, {5: 5.0}).astype(np.float16)
    end = scores({4: 3.0}, {6: 5.0}).astype(np.float16)
    dataset = datasets.Dataset.from_dict(columns)
    assert postprocess(dataset, start, end, [ex]) == {ex.key: "gray teal"}


def test_examples_without_features_get_no_prediction():
    first, second = example("q1"), example("q2")
    predictions = postprocess(features((0, first)), scores({3: 1.0}), scores({3: 1.0}), [first, second])
    assert predictions == {first.key: "red"}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, s, e, x: (f, s[:, :5], e, x), "one shape"),
        (lambda f, s, e, x: (f, s[:1], e[:1], x), "2 features but 1 rows"),
        (lambda f, s, e, x: (f, np.where(s == LOW, np.nan, s), e, x), "feature 100: start/end scores contain NaN"),
        (lambda f, s, e, x: (f, s, e, [example("other")]), "feature 100 refers to example ('q1', 'en', 'en')"),
        (
            lambda f, s, e, x: (f, s, e, [QAExample("q1", "?", "red", (Answer("red", 0),), "en", "en")]),
            "past the end of the context",
        ),
    ],
)
def test_bad_input_is_named(change, message):
    ex = example()
    args = (features((0, ex), (2, ex)), scores({4: 1.0}, {4: 0.0}), scores({4: 1.0}, {4: 0.0}), [ex])
    with pytest.raises(ValueError, match=re.escape(message)):
        postprocess(*change(*args))
