"""Training sets built from one aligned parallel set.

Notation: L = the parallel set's languages, N = its number of aligned ids, (p^k, q^j, a^k)
= the passage and answers in language k paired with the question in language j. Such an
example takes its question from `examples[j][id]` and its passage, answers, title and
article index from `examples[k][id]`; question_lang = j, context_lang = k.

Every builder is a pure function of the parallel set and returns each (id, question
language, passage language) at most once, ordered by id, then passage language, then
question language (both in the set's language order), so equal inputs give equal lists.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import replace
from typing import Callable, Iterable

from dist_xqa.data.parallel import ParallelSet
from dist_xqa.data.records import QAExample

Key = tuple[str, str, str]  # (id, question language, passage language)


def language_branch(
    ps: ParallelSet, lang: str, add_english: bool = True, source_lang: str = "en"
) -> list[QAExample]:
    """Language branch D_k for k = `lang`: {(p^k, q^j, a^k) : j in L}, N·K examples.

    For k != `source_lang` with `add_english` (the paper's default), the source-language
    branch D_source is added as well: 2·N·K examples."""
    _require_languages(ps, lang)
    passage_langs = [lang]
    if add_english and lang != source_lang:
        _require_languages(ps, source_lang, hint="or pass add_english=False")
        passage_langs.append(source_lang)
    return _materialize(ps, _all_ids(ps, [(q, p) for p in passage_langs for q in ps.languages]))


def distillation_set(
    ps: ParallelSet, branches: list[str], add_english: bool = True, source_lang: str = "en"
) -> list[QAExample]:
    """The student's set D = union of `language_branch(k)` for k in `branches`: a set union,
    each (id, q, p) once however many branches hold it. With all K branches this is
    {(p^k, q^j, a^k) : j, k in L}, N·K² examples."""
    if not branches:
        raise ValueError("distillation_set needs at least one branch language")
    keys = [
        ex.key
        for lang in branches
        for ex in language_branch(ps, lang, add_english=add_english, source_lang=source_lang)
    ]
    return _materialize(ps, keys)


def zero_shot(ps: ParallelSet, source_lang: str = "en") -> list[QAExample]:
    """Source language only: {(p^s, q^s, a^s)} for s = `source_lang`, N examples."""
    return translate_train(ps, source_lang)


def translate_train(ps: ParallelSet, lang: str) -> list[QAExample]:
    """One language alone (one model per language, the paper's "w/o LBMRC"):
    {(p^k, q^k, a^k)} for k = `lang`, N examples."""
    _require_languages(ps, lang)
    return _materialize(ps, _all_ids(ps, [(lang, lang)]))


def translate_train_union(ps: ParallelSet) -> list[QAExample]:
    """All languages, question and passage in the same one: {(p^k, q^k, a^k) : k in L},
    N·K examples."""
    return _materialize(ps, _all_ids(ps, [(k, k) for k in ps.languages]))


def mixmrc(ps: ParallelSet) -> list[QAExample]:
    """Every question language with every passage language (one model, no distillation):
    {(p^k, q^j, a^k) : j, k in L}, N·K² examples."""
    return _materialize(ps, _all_ids(ps, [(q, p) for p in ps.languages for q in ps.languages]))


def cross_lingual_sampling(
    ps: ParallelSet, n: int, seed: int, source_lang: str = "en"
) -> list[QAExample]:
    """For each id, S = {source} plus `n` target languages sampled without replacement
    (seeded), and every question x passage pair within S: {(p^k, q^j, a^k) : j, k in S},
    N·(1+n)² examples. An id is sampled among the languages that have it (fewer than `n`
    targets where fewer have it; skipped where the source language lacks it)."""
    _require_languages(ps, source_lang)
    targets = [lang for lang in ps.languages if lang != source_lang]
    if not 0 <= n <= len(targets):
        raise ValueError(f"n must be in 0..{len(targets)} (the target languages {targets}), got {n}")
    rng = random.Random(seed)
    keys: list[Key] = []
    for example_id in ps.ids:
        if not ps.has(source_lang, example_id):
            continue
        available = [lang for lang in targets if ps.has(lang, example_id)]
        chosen = [source_lang, *rng.sample(available, min(n, len(available)))]
        keys.extend((example_id, q, p) for p in chosen for q in chosen)
    return _materialize(ps, keys)


BUILDERS: dict[str, Callable[..., list[QAExample]]] = {
    "language_branch": language_branch,
    "distillation_set": distillation_set,
    "zero_shot": zero_shot,
    "translate_train": translate_train,
    "translate_train_union": translate_train_union,
    "mixmrc": mixmrc,
    "cross_lingual_sampling": cross_lingual_sampling,
}


def build(name: str, ps: ParallelSet, **options) -> list[QAExample]:
    """Build the dataset called `name` (a key of BUILDERS) with the builder's options."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(BUILDERS)}")
    builder = BUILDERS[name]
    try:
        inspect.signature(builder).bind(ps, **options)
    except TypeError as err:
        raise ValueError(
            f"dataset {name!r}: {err}; its options: {list(inspect.signature(builder).parameters)[1:]}"
        ) from None
    return builder(ps, **options)


def _all_ids(ps: ParallelSet, lang_pairs: list[tuple[str, str]]) -> list[Key]:
    """Every id with every (question language, passage language) pair whose two language
    versions have it (an id a language lacks is lost only from that language's pairs)."""
    return [(example_id, q, p) for example_id in ps.ids for q, p in lang_pairs
            if ps.has(q, example_id) and ps.has(p, example_id)]


def _materialize(ps: ParallelSet, keys: Iterable[Key]) -> list[QAExample]:
    """One example per distinct key, in the module's canonical order."""
    rank = {lang: i for i, lang in enumerate(ps.languages)}
    ordered = sorted(set(keys), key=lambda k: (k[0], rank[k[2]], rank[k[1]]))
    return [_pair(ps, *key) for key in ordered]


def _pair(ps: ParallelSet, example_id: str, q: str, p: str) -> QAExample:
    passage = ps.examples[p][example_id]
    return replace(passage, question=ps.examples[q][example_id].question, question_lang=q)


def _require_languages(ps: ParallelSet, *langs: str, hint: str = "") -> None:
    for lang in langs:
        if lang not in ps.languages:
            raise ValueError(
                f"language {lang!r} is not in the parallel set {list(ps.languages)}"
                + (f" ({hint})" if hint else "")
            )
