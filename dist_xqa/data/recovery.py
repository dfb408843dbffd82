"""Answer recovery for data translated with the user's own machine translation.

Translation moves the answer: its text changes and so does its offset. Before
translating, the answer is wrapped in a pair of marker tokens; after translating, the
markers are located and removed, and what they enclose is the answer in the target
language. The translator may lose, duplicate or reorder the markers; such an example
cannot be recovered and is rejected with that reason in the report.

`translate(texts: list[str], src: str, tgt: str) -> list[str]` is supplied by the user
(one output per input, same order).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from dist_xqa.data.records import Answer, DataReport, QAExample

Translate = Callable[[list[str], str, str], list[str]]
DEFAULT_MARKERS = ("[[", "]]")


@dataclass(frozen=True)
class SpanRecovery:
    """A translated passage with the markers removed and the answer they enclosed, or
    the reason recovery failed: markers_lost, markers_duplicated, markers_reordered,
    empty_answer, marker_in_text (the source already holds a marker string)."""

    context: str = ""
    answer: Answer | None = None
    failure: str | None = None


def mark_answer(context: str, answer: Answer, markers: tuple[str, str] = DEFAULT_MARKERS) -> str:
    """The passage with the answer wrapped in the markers. A space inside each marker
    keeps it a separate token for the translator; that space goes with the marker."""
    open_, close = _check_markers(markers)
    end = answer.answer_start + len(answer.text)
    return f"{context[:answer.answer_start]}{open_} {answer.text} {close}{context[end:]}"


def strip_markers(translated: str, markers: tuple[str, str] = DEFAULT_MARKERS) -> SpanRecovery:
    """Locate and remove the markers in a translated passage; the answer is the text
    between them without surrounding whitespace."""
    open_, close = _check_markers(markers)
    n_open, n_close = translated.count(open_), translated.count(close)
    if n_open == 0 or n_close == 0:
        return SpanRecovery(failure="markers_lost")
    if n_open > 1 or n_close > 1:
        return SpanRecovery(failure="markers_duplicated")
    start, end = translated.index(open_), translated.index(close)
    if end < start:
        return SpanRecovery(failure="markers_reordered")
    before, after = translated[:start], translated[end + len(close) :]
    text = translated[start + len(open_) : end].strip()
    if not text:
        return SpanRecovery(failure="empty_answer")
    return SpanRecovery(context=before + text + after, answer=Answer(text, len(before)))


def recover_span(
    context: str,
    answer: Answer,
    translate: Translate,
    src: str,
    tgt: str,
    markers: tuple[str, str] = DEFAULT_MARKERS,
) -> SpanRecovery:
    """Translate one passage from `src` to `tgt` and recover its answer span."""
    if _holds_marker(context, markers):
        return SpanRecovery(failure="marker_in_text")
    marked = mark_answer(context, answer, markers)
    return strip_markers(_translate_all(translate, [marked], src, tgt)[marked], markers)


def recover_answers(
    examples: Sequence[QAExample],
    translate: Translate,
    src: str,
    tgt: str,
    markers: tuple[str, str] = DEFAULT_MARKERS,
) -> tuple[list[QAExample], DataReport]:
    """Translate the examples (question and marked passage) from `src` to `tgt` in one
    `translate` call and return the recovered examples (languages `tgt`, same ids, titles
    and article indices) with the report of every rejected or changed example.

    Only the first answer is carried over (an extra answer would need its own marked copy
    of the passage); examples that had more are listed as repaired
    `answers_after_first_dropped`."""
    report = DataReport(source=f"answer recovery {src}->{tgt}")
    jobs: list[tuple[QAExample, str]] = []
    for ex in examples:
        if ex.question_lang != src or ex.context_lang != src:
            raise ValueError(
                f"example {ex.id!r} is in {ex.question_lang!r}/{ex.context_lang!r}, "
                f"expected source language {src!r}"
            )
        if not ex.answers:
            report.reject("no_answers", ex.id)
        elif _holds_marker(ex.context, markers):
            report.reject("marker_in_text", ex.id)
        else:
            jobs.append((ex, mark_answer(ex.context, ex.answers[0], markers)))

    texts = [text for ex, marked in jobs for text in (marked, ex.question)]
    translated = _translate_all(translate, texts, src, tgt)
    recovered: list[QAExample] = []
    for ex, marked in jobs:
        span = strip_markers(translated[marked], markers)
        question = translated[ex.question]
        if span.failure is not None:
            report.reject(span.failure, ex.id)
            continue
        if not question.strip():
            report.reject("empty_question", ex.id)
            continue
        if len(ex.answers) > 1:
            report.repair("answers_after_first_dropped", ex.id)
        recovered.append(
            replace(
                ex,
                question=question,
                context=span.context,
                answers=(span.answer,),
                question_lang=tgt,
                context_lang=tgt,
            )
        )
    report.kept = len(recovered)
    return recovered, report


def _translate_all(translate: Translate, texts: list[str], src: str, tgt: str) -> dict[str, str]:
    """Translate each distinct text once (passages repeat across questions with the same
    answer) and map source text to translation."""
    unique = list(dict.fromkeys(texts))
    outputs = list(translate(unique, src, tgt)) if unique else []
    if len(outputs) != len(unique) or not all(isinstance(o, str) for o in outputs):
        raise ValueError(
            f"translate({src}->{tgt}) must return one string per input: got "
            f"{len(outputs)} outputs for {len(unique)} texts"
        )
    return dict(zip(unique, outputs))


def _check_markers(markers: tuple[str, str]) -> tuple[str, str]:
    open_, close = markers
    if not open_ or not close or open_ in close or close in open_:
        raise ValueError(
            f"markers must be two non-empty strings, neither inside the other: {markers!r}"
        )
    return open_, close


def _holds_marker(text: str, markers: tuple[str, str]) -> bool:
    return any(m in text for m in markers)
