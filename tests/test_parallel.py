"""Parallel sets: alignment by question id, missing ids, loading one file per language."""
from __future__ import annotations

import json

import pytest

from dist_xqa.data.parallel import align, load_parallel
from dist_xqa.data.records import Answer, DataError, QAExample


def example(qid: str, lang: str, article: int = 0) -> QAExample:
    context = f"context {qid} {lang}"
    return QAExample(
        id=qid,
        question=f"question {qid} {lang}",
        context=context,
        answers=(Answer(lang, context.index(lang)),),
        question_lang=lang,
        context_lang=lang,
        article_index=article,
    )


def test_align_keeps_every_id_in_the_languages_that_have_it_and_reports_the_rest():
    ps = align(
        {
            "en": [example(i, "en") for i in ("c", "a", "b", "d")],
            "es": [example(i, "es") for i in ("a", "b", "c")],
            "de": [example(i, "de") for i in ("b", "c", "a", "e")],
        }
    )
    assert ps.languages == ("en", "es", "de")
    assert ps.ids == ("a", "b", "c", "d", "e")
    assert len(ps) == 5
    assert ps.missing == {"en": ["e"], "es": ["d", "e"], "de": ["d"]}
    assert list(ps.examples["en"]) == ["a", "b", "c", "d"]
    assert list(ps.examples["es"]) == ["a", "b", "c"]
    assert list(ps.examples["de"]) == ["a", "b", "c", "e"]
    for lang in ps.languages:
        assert all(ex.context_lang == lang for ex in ps.examples[lang].values())
    assert ps.examples["es"]["b"].question == "question b es"


def test_align_refuses_examples_under_the_wrong_language():
    with pytest.raises(ValueError, match=r"example 'a' listed under 'es' has question language 'en'"):
        align({"en": [example("a", "en")], "es": [example("a", "en")]})


def test_align_refuses_a_repeated_id():
    with pytest.raises(ValueError, match=r"id 'a' appears twice in language 'en'"):
        align({"en": [example("a", "en"), example("a", "en")]})


def test_align_refuses_ids_in_different_articles_across_languages():
    with pytest.raises(DataError, match=r"id 'b' is in article 1 in 'en' but in article 2 in 'es'"):
        align({"en": [example("a", "en", 0), example("b", "en", 1)], "es": [example("a", "es", 0), example("b", "es", 2)]})


def test_subset_restricts_every_language():
    ps = align({lang: [example(i, lang) for i in "abcd"] for lang in ("en", "de")})
    sub = ps.subset(["d", "b"])
    assert sub.ids == ("b", "d")
    assert {lang: list(by_id) for lang, by_id in sub.examples.items()} == {"en": ["b", "d"], "de": ["b", "d"]}
    with pytest.raises(KeyError, match="ids not in the parallel set"):
        ps.subset(["z"])


def squad_file(path, lang: str, ids: list[str]) -> None:
    qas = [{"id": i, "question": f"q {i}", "answers": [{"text": lang, "answer_start": 4}]} for i in ids]
    document = {"data": [{"title": "t", "paragraphs": [{"context": f"in {lang} text", "qas": qas}]}]}
    path.write_text(json.dumps(document), encoding="utf-8")


def test_load_parallel_finds_one_file_per_language(tmp_path):
    squad_file(tmp_path / "set.en.json", "en", ["x", "y", "z"])
    squad_file(tmp_path / "set.es.json", "es", ["x", "z", "x"])  # a duplicate id, and y missing
    ps, reports = load_parallel(tmp_path, ["en", "es"])
    assert ps.ids == ("x", "y", "z")
    assert ps.missing == {"en": [], "es": ["y"]}
    assert ps.examples["es"]["z"].answers[0].text == "es"
    assert set(reports) == {"en", "es"}
    assert reports["es"].source == str(tmp_path / "set.es.json")
    assert dict(reports["es"].rejected) == {"duplicate_id": ["x"]}


def test_load_parallel_with_a_custom_pattern(tmp_path):
    squad_file(tmp_path / "dev-en.json", "en", ["x"])
    squad_file(tmp_path / "dev-de.json", "de", ["x"])
    ps, _ = load_parallel(tmp_path, ["en", "de"], pattern="dev-{lang}.json")
    assert ps.languages == ("en", "de") and ps.ids == ("x",)


def test_load_parallel_needs_exactly_one_file_per_language(tmp_path):
    squad_file(tmp_path / "a.en.json", "en", ["x"])
    with pytest.raises(FileNotFoundError, match=r"no file matches '\*\.es\.json' in .* \(language 'es'\)"):
        load_parallel(tmp_path, ["en", "es"])
    squad_file(tmp_path / "b.en.json", "en", ["x"])
    with pytest.raises(ValueError, match=r"2 files match '\*\.en\.json' .*: a\.en\.json, b\.en\.json"):
        load_parallel(tmp_path, ["en"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_parallel(tmp_path / "absent", ["en"])
