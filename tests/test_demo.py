from __future__ import annotations

import json
import re

import pytest

from dist_xqa.data import demo
from dist_xqa.data.demo import (
    DEMO_NOISE, PASSAGES_PER_ARTICLE, QUESTIONS_PER_PASSAGE, ensure_demo_corpus, generate_demo_corpus,
)
from dist_xqa.data.loader import load_squad

N_ARTICLES = 20
N_QUESTIONS = N_ARTICLES * PASSAGES_PER_ARTICLE * QUESTIONS_PER_PASSAGE


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def questions(squad):
    """{id: (question, context, answers)} of a SQuAD object."""
    return {qa["id"]: (qa["question"], p["context"], qa["answers"])
            for article in squad["data"] for p in article["paragraphs"] for qa in p["qas"]}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return {lang: read(p) for lang, p in
            generate_demo_corpus(tmp_path_factory.mktemp("clean"), n_articles=N_ARTICLES).items()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_demo_corpus(tmp_path / "a", n_articles=5, seed=3, noise=0.2)
    b = generate_demo_corpus(tmp_path / "b", n_articles=5, seed=3, noise=0.2)
    c = generate_demo_corpus(tmp_path / "c", n_articles=5, seed=4, noise=0.2)
    assert sorted(a) == ["de", "en", "es"] and a["es"].name == "demo.es.json"
    for lang in a:
        assert a[lang].read_bytes() == b[lang].read_bytes()
        assert a[lang].read_bytes() != c[lang].read_bytes()


def test_ids_aligned_and_spans_exact_without_noise(clean):
    per_lang = {lang: questions(squad) for lang, squad in clean.items()}
    assert all(len(q) == N_QUESTIONS for q in per_lang.values())
    assert per_lang["en"].keys() == per_lang["es"].keys() == per_lang["de"].keys()
    for qs in per_lang.values():
        for question, context, answers in qs.values():
            (answer,) = answers
            assert context[answer["answer_start"]:][:len(answer["text"])] == answer["text"]
    # Translations differ in wording, not in facts: the years asked about are the same.
    for qid, (_, _, answers) in per_lang["en"].items():
        if re.fullmatch(r"\d{4}", answers[0]["text"]):
            assert per_lang["de"][qid][2][0]["text"] == answers[0]["text"]


def test_every_language_translates_every_template():
    english = demo._LEXICONS["en"]
    for lexicon in demo._LEXICONS.values():
        assert {k: len(v) for k, v in lexicon.sentences.items()} == {k: len(v) for k, v in english.sentences.items()}
        assert {k: len(v) for k, v in lexicon.questions.items()} == {k: len(v) for k, v in english.questions.items()}


def test_accented_text_present(clean):
    text = json.dumps(clean, ensure_ascii=False)
    assert "¿" in text and "ñ" in text and "ü" in text and "ß" in text


def entity_lists(lang):
    column = demo.SUPPORTED_LANGUAGES.index(lang)
    jobs = [j[column] if isinstance(j[column], str) else j[column][g]
            for j in demo._PROFESSIONS for g in (0, 1)]
    names = [f"{f} {s}" for f in demo._FEMALE_NAMES + demo._MALE_NAMES for s in demo._SURNAMES]
    return [[c[column] for c in demo._CITIES], jobs, [c[column] for c in demo._COLOURS],
            [str(y) for y in demo._YEARS], names]


@pytest.mark.parametrize("lang", ["en", "es", "de"])
def test_distractors_defeat_copying_the_first_entity_of_the_answers_type(clean, lang):
    types = entity_lists(lang)
    first_is_right = 0
    for question, context, answers in questions(clean[lang]).values():
        answer = answers[0]["text"]
        (entities,) = [t for t in types if answer in t]
        found = sorted((m.start(), e) for e in set(entities) if e in context
                       for m in re.finditer(rf"\b{re.escape(e)}\b", context))
        assert len({e for _, e in found}) >= 3, (question, context)  # answer + 2 distractors
        first_is_right += found[0][1] == answer
    assert first_is_right / N_QUESTIONS < 0.5


def test_noise_damages_the_requested_fraction_of_translations_only(tmp_path, clean):
    noisy = {lang: read(p) for lang, p in
             generate_demo_corpus(tmp_path, n_articles=N_ARTICLES, noise=0.3).items()}
    assert noisy["en"] == clean["en"]
    for lang in ("es", "de"):
        before, after = questions(clean[lang]), questions(noisy[lang])
        dropped = before.keys() - after.keys()
        reworded = {q for q in after if after[q][0] != before[q][0]}
        moved = {q for q in after if after[q][2] != before[q][2]}
        assert all(after[q][1] == before[q][1] for q in after)  # passages untouched
        assert dropped and reworded and moved and not (reworded & moved)
        assert len(dropped | reworded | moved) == round(0.3 * N_QUESTIONS)
        for q in moved:  # a moved span is a wrong entity, still an exact span
            (answer,) = after[q][2]
            context = after[q][1]
            assert context[answer["answer_start"]:][:len(answer["text"])] == answer["text"]


@pytest.mark.parametrize("noise", [0.0, DEMO_NOISE])
def test_files_load_without_rejections(tmp_path, noise):
    paths = generate_demo_corpus(tmp_path, n_articles=N_ARTICLES, noise=noise)
    for lang, path in paths.items():
        examples, report = load_squad(path, lang)
        assert report.n_rejected == 0 and report.n_repaired == 0, report.summary()
        assert len(examples) == len(questions(read(path)))


def test_rejects_unsupported_language_and_bad_noise(tmp_path):
    with pytest.raises(ValueError, match="'fr'"):
        generate_demo_corpus(tmp_path, languages=("en", "fr"))
    with pytest.raises(ValueError, match="noise"):
        generate_demo_corpus(tmp_path, noise=1.5)


def test_ensure_generates_on_first_use_only(tmp_path):
    paths = ensure_demo_corpus(tmp_path, n_articles=3, noise=0.0)
    assert set(paths) == {"en", "es", "de"} and all(p.parent == tmp_path / "data" for p in paths.values())
    stamps = {lang: p.stat().st_mtime_ns for lang, p in paths.items()}
    paths["es"].write_text("edited", encoding="utf-8")  # reuse must not rewrite it
    assert ensure_demo_corpus(tmp_path, n_articles=3, noise=0.0) == paths
    assert paths["es"].read_text(encoding="utf-8") == "edited"
    assert paths["en"].stat().st_mtime_ns == stamps["en"]
    regenerated = ensure_demo_corpus(tmp_path, n_articles=4, noise=0.0)
    assert len(questions(read(regenerated["es"]))) == 4 * PASSAGES_PER_ARTICLE * QUESTIONS_PER_PASSAGE
