"""Reading gold answers from SQuAD-format files for scoring.

Scoring reads a file as the official scripts do: every question counts, with its id and
its answers' texts, and nothing is validated away (the data loader's rejections and
repairs are for training sets; dropping a question here would change the totals and the
numbers would no longer equal the official scripts').
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_xqa.data.records import Answer, DataError, QAExample


def read_gold(path: str | Path, lang: str) -> list[QAExample]:
    """Every question of a SQuAD-format JSON file, in file order, as an example with
    question and passage in `lang`. Duplicate ids are kept (each question counts once, as in
    the official scripts)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a SQuAD-format JSON file ({error!r})") from error
    examples = []
    for a_index, article in enumerate(data):
        paragraphs = _get(article, "paragraphs", f"{path}: article {a_index}")
        for p_index, paragraph in enumerate(paragraphs):
            where = f"{path}: article {a_index}, paragraph {p_index}"
            for q_index, qa in enumerate(_get(paragraph, "qas", where)):
                example_id = _get(qa, "id", f"{where}, question {q_index}")
                qa_where = f"{where}, question {q_index} (id {example_id})"
                answers = tuple(
                    Answer(_get(answer, "text", qa_where), answer.get("answer_start", -1))
                    for answer in _get(qa, "answers", qa_where)
                )
                examples.append(
                    QAExample(
                        id=example_id,
                        question=qa.get("question", ""),
                        context=paragraph.get("context", ""),
                        answers=answers,
                        question_lang=lang,
                        context_lang=lang,
                        title=article.get("title", ""),
                        article_index=a_index,
                    )
                )
    return examples


def read_parallel_gold(
    folder: str | Path, languages: Sequence[str], pattern: str = "*.{lang}.json"
) -> tuple[list[QAExample], dict[str, list[str]]]:
    """Every question-language x passage-language pair of a parallel set: one file per
    language in `folder` (matched by `pattern`), aligned by question id. Pair (q, p) holds,
    for each id in both files, the question of file q with the passage and answers of file
    p, in file p's order. Also returns, per language, the ids other languages have and it
    lacks."""
    per_lang: dict[str, dict[str, QAExample]] = {}
    for lang in languages:
        path = _one_file(Path(folder), pattern.format(lang=lang))
        by_id: dict[str, QAExample] = {}
        for example in read_gold(path, lang):
            if example.id in by_id:
                raise DataError(
                    f"{path}: duplicate question id {example.id}; a parallel set needs unique ids"
                )
            by_id[example.id] = example
        per_lang[lang] = by_id
    all_ids = set().union(*per_lang.values())
    missing = {lang: sorted(all_ids - by_id.keys()) for lang, by_id in per_lang.items()}
    examples = [
        QAExample(
            id=passage.id,
            question=per_lang[q][passage.id].question,
            context=passage.context,
            answers=passage.answers,
            question_lang=q,
            context_lang=p,
            title=passage.title,
            article_index=passage.article_index,
        )
        for q in languages
        for p in languages
        for passage in per_lang[p].values()
        if passage.id in per_lang[q]
    ]
    return examples, missing


def _one_file(folder: Path, pattern: str) -> Path:
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        names = [match.name for match in matches]
        raise DataError(f"{folder}: expected one file matching {pattern!r}, found {names}")
    return matches[0]


def _get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    return obj[key]
