"""Evaluation corpora (`data.test` entries) read as the official scripts score them.

A test set yields two lists over the same keys (id, question language, passage language):
- `gold`: every question of its files, unvalidated, in file order: what is scored. The
  official SQuAD v1.1 and MLQA scripts count each question of the file they are given;
  so does the project, and a question that cannot be answered counts as a miss.
- `answerable`: the questions the loader accepts (its validation: empty contexts, bad
  answer offsets, ...): what features are built from and predictions made for.
`rejected` maps every gold key outside `answerable` to the loader's reason.

Formats:
- parallel (XQuAD): one file per language; every question-language x passage-language
  pair of the ids both files have, optionally only the articles in `articles`;
- mlqa (MLQA): one file per (context, question) language pair, named by the pattern's
  `{context}` and `{question}`, each scored on its own and normalised by its context
  language, as MLQA's evaluation script does per file.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from dist_xqa.config import EvalSetConfig
from dist_xqa.data.loader import load_squad
from dist_xqa.data.records import DataError, DataReport, QAExample
from dist_xqa.data.gold import read_gold

Key = tuple[str, str, str]


@dataclass
class EvalCorpus:
    gold: list[QAExample]
    answerable: list[QAExample]
    rejected: dict[Key, str] = field(default_factory=dict)  # gold key -> the loader's reason
    files: list[str] = field(default_factory=list)


def eval_files(spec: EvalSetConfig) -> dict[tuple[str, str], Path]:
    """The files of a test set: (question language, passage language) -> path for mlqa,
    (lang, lang) -> path for parallel. Raises DataError naming the set, the folder and
    the pattern when a file is missing, ambiguous or unreadable."""
    folder = Path(spec.folder)
    where = f"test set '{spec.name}'"
    if not folder.is_dir():
        raise DataError(f"{where}: folder {folder} is not a directory")
    if spec.format == "mlqa":
        wanted = {(q, c): spec.file_pattern.format(context=c, question=q)
                  for c in spec.languages for q in spec.languages}
    else:
        wanted = {(lang, lang): spec.file_pattern.format(lang=lang) for lang in spec.languages}
    files = {}
    for pair, glob in wanted.items():
        matches = sorted(folder.glob(glob))
        if len(matches) != 1:
            found = ", ".join(m.name for m in matches) or "none"
            raise DataError(f"{where}: expected one file matching {glob!r} in {folder} "
                            f"(question language {pair[0]}, passage language {pair[1]}), found {found}")
        try:
            with open(matches[0], "rb") as f:
                f.read(1)
        except OSError as err:
            raise DataError(f"{where}: cannot read {matches[0]}: {err.strerror}") from None
        files[pair] = matches[0]
    return files


def read_eval_corpus(spec: EvalSetConfig) -> EvalCorpus:
    files = eval_files(spec)
    if spec.format == "mlqa":
        return _read_mlqa(files)
    return _read_parallel(files, spec.articles)


def _read_mlqa(files: dict[tuple[str, str], Path]) -> EvalCorpus:
    corpus = EvalCorpus([], [], files=[str(p) for p in files.values()])
    for (q, c), path in files.items():
        gold = [replace(ex, question_lang=q) for ex in read_gold(path, c)]
        valid, report = load_squad(path, c)
        _add(corpus, gold, [replace(ex, question_lang=q) for ex in valid], {c: report, q: report})
    return corpus


def _read_parallel(files: dict[tuple[str, str], Path], articles: list[int] | None) -> EvalCorpus:
    keep = range(*articles) if articles else None
    langs = [lang for lang, _ in files]
    gold_by: dict[str, dict[str, QAExample]] = {}
    valid_by: dict[str, dict[str, QAExample]] = {}
    reports: dict[str, DataReport] = {}
    for lang in langs:
        path = files[lang, lang]
        gold_by[lang] = {}
        for ex in read_gold(path, lang):
            if keep is None or ex.article_index in keep:
                if ex.id in gold_by[lang]:
                    raise DataError(f"{path}: duplicate question id {ex.id}; a parallel set needs unique ids")
                gold_by[lang][ex.id] = ex
        valid, reports[lang] = load_squad(path, lang)
        valid_by[lang] = {ex.id: ex for ex in valid}
    corpus = EvalCorpus([], [], files=[str(files[lang, lang]) for lang in langs])
    for q in langs:
        for p in langs:
            # Pair (q, p): the passages and answers of file p, the questions of file q, in
            # file p's order; ids file q lacks have no question in q and make no example.
            gold = [replace(ex, question=gold_by[q][i].question, question_lang=q)
                    for i, ex in gold_by[p].items() if i in gold_by[q]]
            valid = [replace(valid_by[p][ex.id], question=valid_by[q][ex.id].question, question_lang=q)
                     for ex in gold if ex.id in valid_by[p] and ex.id in valid_by[q]]
            _add(corpus, gold, valid, reports)
    return corpus


def _add(corpus: EvalCorpus, gold: list[QAExample], valid: list[QAExample],
         reports: dict[str, DataReport]) -> None:
    corpus.gold += gold
    corpus.answerable += valid
    answerable = {ex.key for ex in valid}
    for ex in gold:
        if ex.key not in answerable:
            corpus.rejected[ex.key] = (_reason(reports[ex.context_lang], ex.id)
                                       or _reason(reports[ex.question_lang], ex.id) or "rejected")


def _reason(report: DataReport, example_id: str) -> str | None:
    for reason, ids in report.rejected.items():
        if example_id in ids:
            return f"{reason} ({report.source})"
    return None
