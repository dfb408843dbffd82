"""The command line that scores a prediction file, like the official scripts:

    python -m dist_xqa.eval DATASET.json PREDICTIONS.json [--normalization squad|mlqa] [--lang LL]

prints {"exact_match": ..., "f1": ...}; PREDICTIONS is {id: answer_text}. `--lang` is the
answer language, required by `mlqa`. With `--matrix`, DATASET is a folder with one file per
language of `--languages` (matched by *.{lang}.json), PREDICTIONS is {"q-p": {id: text}}
(e.g. "en-es": question in en, passage in es), and the full report is printed. A question
without a prediction scores 0; their number is written to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_xqa.data.records import DataError, QAExample
from dist_xqa.data.gold import read_gold, read_parallel_gold
from dist_xqa.eval.metrics import NORMALIZATIONS
from dist_xqa.eval.report import Key, pair_name, score

# Language recorded for a single file scored with `squad`, whose rules ignore the language.
UNDETERMINED_LANG = "und"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dist_xqa.eval", description="EM/F1 of extractive QA predictions."
    )
    parser.add_argument(
        "dataset", help="SQuAD-format JSON file (with --matrix: a folder, one file per language)"
    )
    parser.add_argument(
        "predictions", help="JSON {id: answer text} (with --matrix: {\"q-p\": {id: answer text}})"
    )
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="squad")
    parser.add_argument("--lang", help="answer language (required by --normalization mlqa)")
    parser.add_argument("--matrix", action="store_true", help="score every question x passage language pair")
    parser.add_argument("--languages", help="comma-separated languages of the parallel set, with --matrix")
    args = parser.parse_args(argv)
    try:
        if args.matrix:
            if not args.languages:
                parser.error("--matrix needs --languages (e.g. en,es,de)")
            if args.lang:
                parser.error("--lang is for one file; with --matrix each passage's language is used")
            languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
            examples, missing = read_parallel_gold(args.dataset, languages)
            for lang, ids in missing.items():
                if ids:
                    print(f"warning: {len(ids)} question ids absent in {lang}: {_first(ids)}",
                          file=sys.stderr)
            predictions = _read_pair_predictions(args.predictions, languages)
        else:
            if args.normalization == "mlqa" and not args.lang:
                parser.error("--normalization mlqa needs --lang, the answer language")
            lang = args.lang or UNDETERMINED_LANG
            examples = read_gold(args.dataset, lang)
            answers = _check_answers(_read_json(args.predictions), args.predictions)
            predictions = {(i, lang, lang): text for i, text in answers.items()}
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _warn_unanswered(examples, predictions, with_pair=args.matrix)
    report = score(examples, predictions, args.normalization)
    if args.matrix:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(json.dumps({"exact_match": report["pooled"]["exact_match"], "f1": report["pooled"]["f1"]}))
    return 0


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read predictions ({error!r})") from error


def _check_answers(answers: Any, where: str) -> dict[str, str]:
    """`answers` if it is {id: answer text}; else a DataError naming `where` and the id."""
    if not isinstance(answers, dict):
        raise DataError(f"{where}: predictions must be a JSON object {{id: answer text}}")
    for example_id, text in answers.items():
        if not isinstance(text, str):
            raise DataError(f"{where}: prediction for id {example_id} is {type(text).__name__}, not a string")
    return answers


def _read_pair_predictions(path: str | Path, languages: Sequence[str]) -> dict[Key, str]:
    """Predictions keyed by example key, from {"q-p": {id: answer text}}."""
    by_pair = _read_json(path)
    if not isinstance(by_pair, dict):
        raise DataError(f"{path}: predictions must be a JSON object {{\"q-p\": {{id: answer text}}}}")
    names = {pair_name(q, p): (q, p) for q in languages for p in languages}
    predictions: dict[Key, str] = {}
    for name, answers in by_pair.items():
        if name not in names:
            raise DataError(f"{path}: key {name!r} is not a pair q-p of the languages {list(languages)}")
        q, p = names[name]
        for example_id, text in _check_answers(answers, f"{path} [{name}]").items():
            predictions[(example_id, q, p)] = text
    return predictions


def _warn_unanswered(examples: Sequence[QAExample], predictions: dict[Key, str], with_pair: bool) -> None:
    """One line on stderr: how many questions have no prediction, and the first of them."""
    unanswered = [
        f"{pair_name(e.question_lang, e.context_lang)}:{e.id}" if with_pair else e.id
        for e in examples
        if e.key not in predictions
    ]
    if unanswered:
        print(
            f"warning: {len(unanswered)} of {len(examples)} questions unanswered will receive score 0: "
            f"{_first(unanswered)}",
            file=sys.stderr,
        )


def _first(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")
