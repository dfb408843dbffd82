"""Parallel sets: K language versions of one QA dataset, aligned by question id.

A question keeps its id across languages, so the versions are joined on it. An id that
some languages lack (a translation that failed, an answer the loader rejected) stays in
the languages that have it: builders pair two languages only where both have the id, so
it is lost only from the pairs it cannot make. `missing` reports, per language, the ids
it lacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dist_xqa.data.loader import load_squad
from dist_xqa.data.records import DataError, DataReport, QAExample


@dataclass
class ParallelSet:
    """`ids` (sorted) is every id of any language; `examples[lang][id]` holds the ids
    `lang` has, in `ids` order; `missing[lang]` lists the ids of `ids` that `lang` lacks."""

    languages: tuple[str, ...]
    ids: tuple[str, ...]
    examples: dict[str, dict[str, QAExample]]
    missing: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def has(self, lang: str, example_id: str) -> bool:
        return example_id in self.examples[lang]

    def any_example(self, example_id: str) -> QAExample:
        """The id's example in the first language that has it (its article index is the
        same in every language: `align` checks)."""
        return next(by_id[example_id] for by_id in self.examples.values() if example_id in by_id)

    def subset(self, ids: set[str] | list[str]) -> ParallelSet:
        """The set restricted to `ids` (e.g. one split), `missing` restricted with it."""
        keep = set(ids)
        unknown = keep.difference(self.ids)
        if unknown:
            raise KeyError(f"ids not in the parallel set: {sorted(unknown)[:5]}")
        return ParallelSet(
            languages=self.languages,
            ids=tuple(i for i in self.ids if i in keep),
            examples={
                lang: {i: ex for i, ex in by_id.items() if i in keep}
                for lang, by_id in self.examples.items()
            },
            missing={lang: [i for i in self.missing.get(lang, []) if i in keep] for lang in self.languages},
        )


def align(per_lang: dict[str, list[QAExample]]) -> ParallelSet:
    """Join the language versions on question id (every id of any language, see the module
    docstring); languages keep the dict's order.

    Raises ValueError when an example's languages differ from its key, an id repeats in
    one language, or one id sits in different articles across languages (splits by
    article would then put one question in two splits)."""
    if not per_lang:
        raise ValueError("align needs at least one language")
    by_lang: dict[str, dict[str, QAExample]] = {}
    for lang, examples in per_lang.items():
        by_id: dict[str, QAExample] = {}
        for ex in examples:
            if ex.question_lang != lang or ex.context_lang != lang:
                raise ValueError(
                    f"example {ex.id!r} listed under {lang!r} has question language "
                    f"{ex.question_lang!r} and passage language {ex.context_lang!r}"
                )
            if ex.id in by_id:
                raise ValueError(f"id {ex.id!r} appears twice in language {lang!r}")
            by_id[ex.id] = ex
        by_lang[lang] = by_id

    ids = tuple(sorted(set().union(*by_lang.values())))
    for example_id in ids:
        holders = [(lang, by_id[example_id]) for lang, by_id in by_lang.items() if example_id in by_id]
        first, article = holders[0][0], holders[0][1].article_index
        for lang, ex in holders[1:]:
            if ex.article_index != article:
                raise DataError(
                    f"id {example_id!r} is in article {article} in {first!r} but in article "
                    f"{ex.article_index} in {lang!r}: the language versions "
                    f"must keep the same article order"
                )
    return ParallelSet(
        languages=tuple(by_lang),
        ids=ids,
        examples={lang: {i: by_id[i] for i in ids if i in by_id} for lang, by_id in by_lang.items()},
        missing={lang: [i for i in ids if i not in by_id] for lang, by_id in by_lang.items()},
    )


def load_parallel(
    folder: str | Path, languages: list[str] | tuple[str, ...], pattern: str = "*.{lang}.json"
) -> tuple[ParallelSet, dict[str, DataReport]]:
    """Load one file per language from `folder` (found by `pattern` with `{lang}` filled
    in) and align them. Returns the parallel set and each language's loading report."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"parallel data folder {folder} does not exist")
    per_lang: dict[str, list[QAExample]] = {}
    reports: dict[str, DataReport] = {}
    for lang in languages:
        glob = pattern.format(lang=lang)
        matches = sorted(folder.glob(glob))
        if not matches:
            raise FileNotFoundError(f"no file matches {glob!r} in {folder} (language {lang!r})")
        if len(matches) > 1:
            raise ValueError(
                f"{len(matches)} files match {glob!r} in {folder} (language {lang!r}), "
                f"expected one: {', '.join(m.name for m in matches)}"
            )
        per_lang[lang], reports[lang] = load_squad(matches[0], lang)
    return align(per_lang), reports
