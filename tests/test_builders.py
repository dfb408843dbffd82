"""Dataset builders: composition, counts, language pairs, ids, de-duplication, order."""
from __future__ import annotations

import copy
from collections import Counter

import pytest

from dist_xqa.data import builders
from dist_xqa.data.builders import (
    build,
    cross_lingual_sampling,
    distillation_set,
    language_branch,
    mixmrc,
    translate_train,
    translate_train_union,
    zero_shot,
)
from dist_xqa.data.parallel import ParallelSet, align
from dist_xqa.data.records import Answer, QAExample

LANGS = ("en", "es", "de")


def parallel_set(n_ids: int = 4, langs=LANGS) -> ParallelSet:
    def example(i: int, lang: str) -> QAExample:
        context = f"passage {i} in {lang}: answer-{lang}-{i}."
        answer = f"answer-{lang}-{i}"
        return QAExample(
            id=f"id{i:02d}", question=f"question {i} in {lang}?", context=context,
            answers=(Answer(answer, context.index(answer)),), question_lang=lang,
            context_lang=lang, title=f"title {lang}", article_index=i // 2,
        )

    return align({lang: [example(i, lang) for i in range(n_ids)] for lang in langs})


PS = parallel_set()
N, K = len(PS.ids), len(LANGS)


def keys(examples: list[QAExample]) -> list[tuple[str, str, str]]:
    return [ex.key for ex in examples]


def every(langs_q, langs_p, ps: ParallelSet = PS) -> set[tuple[str, str, str]]:
    return {(i, q, p) for i in ps.ids for q in langs_q for p in langs_p}


def test_an_example_takes_its_question_from_q_and_the_rest_from_p():
    for ex in mixmrc(PS):
        passage, question = PS.examples[ex.context_lang][ex.id], PS.examples[ex.question_lang][ex.id]
        assert ex.question == question.question
        assert (ex.context, ex.answers, ex.title, ex.article_index) == (
            passage.context, passage.answers, passage.title, passage.article_index
        )
    mixed = {ex.key: ex for ex in mixmrc(PS)}[("id01", "de", "es")]
    assert (mixed.question, mixed.context, mixed.title) == ("question 1 in de?", "passage 1 in es: answer-es-1.", "title es")


def test_english_branch_pairs_english_passages_with_every_question_language():
    branch = language_branch(PS, "en")
    assert len(branch) == N * K
    assert set(keys(branch)) == every(LANGS, ["en"])


def test_non_english_branch_adds_the_english_branch_by_default():
    with_english = language_branch(PS, "es")
    assert len(with_english) == 2 * N * K
    assert set(keys(with_english)) == every(LANGS, ["es", "en"])
    alone = language_branch(PS, "es", add_english=False)
    assert len(alone) == N * K
    assert set(keys(alone)) == every(LANGS, ["es"])
    assert set(keys(language_branch(PS, "en", source_lang="de"))) == every(LANGS, ["en", "de"])


def test_branch_errors_name_the_language():
    with pytest.raises(ValueError, match=r"language 'fr' is not in the parallel set \['en', 'es', 'de'\]"):
        language_branch(PS, "fr")
    no_english = parallel_set(langs=("es", "de"))
    with pytest.raises(ValueError, match=r"language 'en' is not in .* \(or pass add_english=False\)"):
        language_branch(no_english, "es")
    assert len(language_branch(no_english, "es", add_english=False)) == N * 2


def test_distillation_set_is_the_union_of_branches_each_key_once():
    branch_sizes = sum(len(language_branch(PS, k)) for k in LANGS)
    union = distillation_set(PS, list(LANGS))
    assert branch_sizes == N * K + 2 * (2 * N * K)  # the English branch is held three times
    assert len(union) == N * K * K == len(set(keys(union)))
    assert set(keys(union)) == every(LANGS, LANGS)
    assert keys(distillation_set(PS, ["es"])) == keys(language_branch(PS, "es"))
    assert set(keys(distillation_set(PS, ["es", "de"], add_english=False))) == every(LANGS, ["es", "de"])
    with pytest.raises(ValueError, match="at least one branch"):
        distillation_set(PS, [])


def test_order_is_canonical_whatever_the_branch_order():
    assert keys(distillation_set(PS, ["de", "es", "en"])) == keys(distillation_set(PS, ["en", "es", "de"]))
    assert keys(translate_train_union(PS))[:4] == [
        ("id00", "en", "en"), ("id00", "es", "es"), ("id00", "de", "de"), ("id01", "en", "en")
    ]
    assert keys(language_branch(PS, "es"))[:4] == [
        ("id00", "en", "en"), ("id00", "es", "en"), ("id00", "de", "en"), ("id00", "en", "es")
    ]


def test_zero_shot_is_the_source_language_alone():
    assert keys(zero_shot(PS)) == [(i, "en", "en") for i in PS.ids]
    assert keys(zero_shot(PS, source_lang="de")) == [(i, "de", "de") for i in PS.ids]


def test_translate_train_one_language_and_the_union():
    assert keys(translate_train(PS, "es")) == [(i, "es", "es") for i in PS.ids]
    union = translate_train_union(PS)
    assert len(union) == N * K
    assert set(keys(union)) == {(i, k, k) for i in PS.ids for k in LANGS}


def test_mixmrc_holds_every_language_pair_once_per_id():
    mixed = mixmrc(PS)
    assert len(mixed) == N * K * K
    assert Counter((ex.question_lang, ex.context_lang) for ex in mixed) == {(q, p): N for q in LANGS for p in LANGS}


def test_cross_lingual_sampling_pairs_every_language_of_each_sample():
    ps = parallel_set(n_ids=20)
    sampled = cross_lingual_sampling(ps, n=1, seed=0)
    assert len(sampled) == 20 * (1 + 1) ** 2
    languages_of: dict[str, set[str]] = {}
    for ex in sampled:
        languages_of.setdefault(ex.id, set()).update({ex.question_lang, ex.context_lang})
    for example_id, chosen in languages_of.items():
        assert len(chosen) == 2 and "en" in chosen
        assert {k for k in keys(sampled) if k[0] == example_id} == {(example_id, q, p) for q in chosen for p in chosen}
    assert {lang for chosen in languages_of.values() for lang in chosen} == set(LANGS)
    assert keys(cross_lingual_sampling(ps, n=1, seed=0)) == keys(sampled)
    assert keys(cross_lingual_sampling(ps, n=1, seed=1)) != keys(sampled)


def test_cross_lingual_sampling_extremes_and_bounds():
    assert keys(cross_lingual_sampling(PS, n=0, seed=3)) == keys(zero_shot(PS))
    assert keys(cross_lingual_sampling(PS, n=K - 1, seed=3)) == keys(mixmrc(PS))
    with pytest.raises(ValueError, match=r"n must be in 0\.\.2"):
        cross_lingual_sampling(PS, n=3, seed=0)


def test_every_builder_covers_every_id_and_leaves_the_set_unchanged():
    before = copy.deepcopy(PS)
    for name, options in [
        ("language_branch", {"lang": "de"}), ("distillation_set", {"branches": ["es"]}),
        ("zero_shot", {}), ("translate_train", {"lang": "de"}), ("translate_train_union", {}),
        ("mixmrc", {}), ("cross_lingual_sampling", {"n": 1, "seed": 0}),
    ]:
        built = build(name, PS, **options)
        assert {ex.id for ex in built} == set(PS.ids), name
        assert len(set(keys(built))) == len(built), name
    assert PS == before


def test_build_registry_dispatches_and_reports_bad_names_and_options():
    assert set(builders.BUILDERS) == {
        "language_branch", "distillation_set", "zero_shot", "translate_train",
        "translate_train_union", "mixmrc", "cross_lingual_sampling",
    }
    assert build("language_branch", PS, lang="es", add_english=False) == language_branch(PS, "es", add_english=False)
    assert build("mixmrc", PS) == mixmrc(PS)
    with pytest.raises(ValueError, match=r"unknown dataset 'mix'; valid names: language_branch, distillation_set"):
        build("mix", PS)
    with pytest.raises(ValueError, match=r"dataset 'translate_train': missing a required argument: 'lang'"):
        build("translate_train", PS)
    with pytest.raises(ValueError, match=r"dataset 'mixmrc': got an unexpected keyword argument 'lang'"):
        build("mixmrc", PS, lang="es")
