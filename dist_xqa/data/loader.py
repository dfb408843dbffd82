"""Load SQuAD v1.1-format files into validated `QAExample` records.

Two layouts are read: a JSON file `{"data": [article, ...]}` and JSON Lines (`.jsonl`), one
article object per line. An article is `{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}]}]}]}`.

Problems that make the file unreadable as SQuAD (bad bytes, bad JSON, missing structure
above the question, a question without an id) raise `DataError` naming the file and the
position. Problems confined to one question reject or repair that question and are
recorded in the `DataReport` by reason with the question id, so nothing is lost silently:

rejected  duplicate_id, missing_question, empty_question, empty_context, missing_answers,
          no_answers, and (when no answer survives) the first dropped answer's reason:
          answer_invalid, answer_out_of_range, answer_mismatch
repaired  answer_start_repaired (moved to the nearest exact occurrence in the window),
          answer_dropped (some answers unrecoverable, at least one kept)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_xqa.data.records import Answer, DataError, DataReport, QAExample

# Annotation tools and translated files shift answer_start by a few characters (stripped
# whitespace, re-encoded entities); a small window repairs those without guessing at
# answers that moved elsewhere in the passage.
DEFAULT_REPAIR_WINDOW = 20


def load_squad(
    path: str | Path, lang: str, *, repair_window: int = DEFAULT_REPAIR_WINDOW
) -> tuple[list[QAExample], DataReport]:
    """Read one SQuAD-format file in language `lang` (question and passage both in it).

    Returns the valid examples in file order, each with `article_index` = the article's
    position in the file, and the report of every rejected or repaired question."""
    if not lang:
        raise ValueError(f"{path}: a language code is required")
    path = Path(path)
    report = DataReport(source=str(path))
    examples: list[QAExample] = []
    seen_ids: set[str] = set()
    for article_index, (article, where) in enumerate(_read_articles(path)):
        paragraphs = _field(article, "paragraphs", list, where)
        title = article.get("title", "")  # optional: only carried along for the user
        if not isinstance(title, str):
            raise DataError(f"{where}: field 'title' must be str, got {type(title).__name__}")
        for p_index, paragraph in enumerate(paragraphs):
            p_where = f"{where}, paragraph {p_index}"
            context = _field(paragraph, "context", str, p_where)
            for q_index, qa in enumerate(_field(paragraph, "qas", list, p_where)):
                q_where = f"{p_where}, question {q_index}"
                example_id = _field(qa, "id", str, q_where)
                if not example_id:
                    raise DataError(f"{q_where}: empty 'id'")
                if example_id in seen_ids:
                    report.reject("duplicate_id", example_id)
                    continue
                seen_ids.add(example_id)
                answers = _validate_question(qa, context, repair_window, example_id, report)
                if answers is None:
                    continue
                examples.append(
                    QAExample(
                        id=example_id,
                        question=qa["question"],
                        context=context,
                        answers=answers,
                        question_lang=lang,
                        context_lang=lang,
                        title=title,
                        article_index=article_index,
                    )
                )
    report.kept = len(examples)
    return examples, report


def _read_articles(path: Path) -> list[tuple[Any, str]]:
    """Decode and parse the file; return each article with a description of where it is."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}: not UTF-8: byte offset {err.start} (line {line}) holds "
            f"{raw[err.start:err.end]!r}"
        ) from None
    if path.suffix == ".jsonl":
        articles = []
        # Split on "\n" only: str.splitlines would also break at U+2028 inside strings.
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no} (article {len(articles)})"
            articles.append((_parse_json(line, path, line_no), where))
        return articles
    document = _parse_json(text, path)
    data = _field(document, "data", list, str(path))
    return [(article, f"{path}: article {i}") for i, article in enumerate(data)]


def _parse_json(text: str, path: Path, line_no: int | None = None) -> Any:
    """Parse a whole JSON file, or line `line_no` of a JSON Lines file."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{path}: line {line_no}" if line_no else str(path)
        position = f"column {err.colno}" if line_no else f"line {err.lineno}, column {err.colno}"
        raise DataError(f"{where}: malformed JSON at {position}: {err.msg}") from None


def _field(obj: Any, key: str, kind: type, where: str) -> Any:
    """`obj[key]`, which must exist and be of `kind`; otherwise a fatal DataError."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise DataError(
            f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _validate_question(
    qa: dict, context: str, window: int, example_id: str, report: DataReport
) -> tuple[Answer, ...] | None:
    """The question's valid answers, or None when the question is rejected (recorded)."""
    question = qa.get("question")
    reason = None
    if not isinstance(question, str):
        reason = "missing_question"
    elif not question.strip():
        reason = "empty_question"
    elif not context.strip():
        reason = "empty_context"
    elif not isinstance(qa.get("answers"), list):
        reason = "missing_answers"
    elif not qa["answers"]:
        reason = "no_answers"
    if reason is not None:
        report.reject(reason, example_id)
        return None

    kept: list[Answer] = []
    dropped: list[str] = []
    repaired = False
    for raw in qa["answers"]:
        answer, outcome = _check_answer(raw, context, window)
        if answer is None:
            dropped.append(outcome)
            continue
        kept.append(answer)
        repaired |= outcome == "answer_start_repaired"
    if not kept:
        report.reject(dropped[0], example_id)
        return None
    if repaired:
        report.repair("answer_start_repaired", example_id)
    if dropped:
        report.repair("answer_dropped", example_id)
    return tuple(kept)


def _check_answer(raw: Any, context: str, window: int) -> tuple[Answer | None, str]:
    """Validate one answer; return (answer, "ok" | "answer_start_repaired") or (None, reason)."""
    if not isinstance(raw, dict):
        return None, "answer_invalid"
    text, start = raw.get("text"), raw.get("answer_start")
    # bool is an int subclass; `true` is not an offset.
    if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool):
        return None, "answer_invalid"
    if start >= 0 and context[start : start + len(text)] == text:
        return Answer(text, start), "ok"
    nearest = _nearest_occurrence(context, text, start, window)
    if nearest is not None:
        return Answer(text, nearest), "answer_start_repaired"
    in_range = 0 <= start <= len(context) - len(text)
    return None, "answer_mismatch" if in_range else "answer_out_of_range"


def _nearest_occurrence(context: str, text: str, start: int, window: int) -> int | None:
    """Start of the occurrence of `text` closest to `start` that lies entirely within
    `window` characters of the claimed span; the earlier one on a tie."""
    lo = max(0, start - window)
    hi = min(len(context), start + len(text) + window)
    best = None
    found = context.find(text, lo, hi)
    while found != -1:
        if best is None or abs(found - start) < abs(best - start):
            best = found
        found = context.find(text, found + 1, hi)
    return best
