"""EM/F1 as the official SQuAD v1.1 and MLQA scripts compute them, the language-pair report,
the command line, and gold answers of the real XQuAD files scoring 100."""
from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

from dist_xqa.data.records import Answer, QAExample
from dist_xqa.data.gold import read_gold
from dist_xqa.eval.metrics import normalize_mlqa, normalize_squad
from dist_xqa.eval.metrics import exact_match, f1, max_over_ground_truths, normalizer
from dist_xqa.eval.report import score
from test_testsets import mlqa_normalize, official_evaluate, squad_normalize

REPO = Path(__file__).resolve().parents[1]
XQUAD = Path(os.environ.get("DIST_XQA_XQUAD", REPO.parent / "shared" / "data" / "xquad"))
XQUAD_LANGS = ["en", "es", "de", "ar", "hi", "vi"]


# --- normalisation -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat!", "cat"),
        ("an Apple, a pear", "apple pear"),
        ("Theory of another", "theory of another"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so "the" is no longer a word
        ("$5", "5"),  # $ is in ASCII string.punctuation
        ("«Gato» — ¡sí!", "«gato» — ¡sí"),  # only ASCII punctuation is removed
        ("el gato", "el gato"),  # only English articles
        ("Straße\u00a0GRÖSSE", "straße grösse"),  # Unicode lower case and whitespace
    ],
)
def test_squad_normalisation(text, expected):
    assert normalize_squad(text) == expected


@pytest.mark.parametrize(
    "text, lang, expected",
    [
        ("The Cat", "en", "cat"),
        ("Los gatos y las casas", "es", "gatos y casas"),
        ("¿Dónde está el gato?", "es", "dónde está gato"),
        ("the gato", "es", "the gato"),  # English articles are not Spanish ones
        ("Der Hund des Nachbarn", "de", "hund nachbarn"),
        ("in einem Haus", "de", "in haus"),
        ("Những con mèo của tôi", "vi", "con mèo tôi"),
        ("الكتاب", "ar", "كتاب"),
        ("مال", "ar", "م"),  # the script replaces every ال, inside words too
        ("the किताब।", "hi", "the किताब"),  # no article list; the danda is punctuation (Po)
        ("«gato» — ¡sí!", "es", "gato sí"),  # all Unicode punctuation
        ("€5", "en", "€5"),  # a currency symbol (Sc) is not punctuation
        ("$5", "en", "5"),  # ... unless ASCII string.punctuation lists it
        ("北京大学。", "zh", "北 京 大 学"),  # zh: one token per character
        ("2008年奥运会", "zh", "2008 年 奥 运 会"),  # mixed segmentation
        ("NBA球员 Yao Ming", "zh", "nba 球 员 yao ming"),
        ("㐀㐁", "zh", "㐀㐁"),  # outside the script's U+4E00..U+9FA5: not split
        ("The cat «x»", "ru", "the cat x"),  # another language: no article list
        ("北京大学", "ja", "北京大学"),  # another language: whitespace tokens
    ],
)
def test_mlqa_normalisation(text, lang, expected):
    assert normalize_mlqa(text, lang) == expected


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="unknown normalization 'tydi'"):
        normalizer("tydi", "en")
    with pytest.raises(ValueError, match="unknown normalization 'tydi'"):
        score([], {}, "tydi")


# --- EM / F1 -----------------------------------------------------------------------------

def test_f1_counts_shared_tokens_with_multiplicity():
    squad = normalizer("squad", "en")
    # [quick brown fox] vs [quick fox jumps]: 2 shared, P = R = 2/3
    assert f1("the quick brown fox", "quick fox jumps", squad) == pytest.approx(2 / 3)
    # [x x y] vs [x y y]: min counts x 1, y 1 -> 2 shared, P = R = 2/3
    assert f1("x x y", "x y y", squad) == pytest.approx(2 / 3)
    assert f1("red house small", "the red house", squad) == pytest.approx(0.8)  # P 2/3, R 1
    assert exact_match("red house small", "the red house", squad) == 0.0


def test_zh_f1_is_over_characters_under_mlqa_only():
    # [2 0 0 8 年] is not it: "2008" stays one token, then one token per character.
    # pred [2008 年] vs gold [2008 年 奥 运 会]: P 1, R 2/5 -> F1 4/7
    assert f1("2008年", "2008年奥运会", normalizer("mlqa", "zh")) == pytest.approx(4 / 7)
    assert f1("北京", "北京大学", normalizer("mlqa", "zh")) == pytest.approx(2 / 3)
    assert f1("北京", "北京大学", normalizer("squad", "zh")) == 0.0  # one token each


def test_texts_normalising_to_nothing_match_exactly_with_f1_zero():
    # The official scripts' behaviour: "" == "" for EM, no shared token for F1.
    squad = normalizer("squad", "en")
    assert (exact_match("the", "a", squad), f1("the", "a", squad)) == (1.0, 0.0)


def test_maximum_over_gold_answers():
    squad = normalizer("squad", "en")
    assert max_over_ground_truths("cat", ["dog", "the cat"], squad) == (1.0, 1.0)
    em, best_f1 = max_over_ground_truths("black cat", ["cat", "black dog"], squad)
    assert em == 0.0 and best_f1 == pytest.approx(2 / 3)  # max(2/3, 1/2)
    with pytest.raises(ValueError):
        max_over_ground_truths("cat", [], squad)


# --- report ------------------------------------------------------------------------------

def qa(example_id: str, q: str, p: str, *answers: str) -> QAExample:
    return QAExample(example_id, "?", " ".join(answers), tuple(Answer(a, 0) for a in answers), q, p)


# Hand-made set in en and de; per example (EM, F1) under squad in the comments.
EXAMPLES = [
    qa("1", "en", "en", "Paris"),  # "Paris": (1, 1)
    qa("2", "en", "en", "the red house"),  # "red house small": (0, 0.8)
    qa("1", "de", "de", "Paris"),  # unanswered: (0, 0)
    qa("1", "en", "de", "die Stadt Paris"),  # "Stadt Paris": squad (0, 0.8); mlqa/de (1, 1)
    qa("1", "de", "en", "the city"),  # "city": (1, 1)
]
PREDICTIONS = {
    ("1", "en", "en"): "Paris",
    ("2", "en", "en"): "red house small",
    ("1", "en", "de"): "Stadt Paris",
    ("1", "de", "en"): "city",
}


def test_report_per_pair_language_and_averages():
    report = score(EXAMPLES, PREDICTIONS, "squad")
    approx = pytest.approx
    assert report["pairs"] == {
        "en-en": {"exact_match": 50.0, "f1": approx(90.0), "count": 2, "unanswered": 0},
        "de-de": {"exact_match": 0.0, "f1": 0.0, "count": 1, "unanswered": 1},
        "en-de": {"exact_match": 0.0, "f1": approx(80.0), "count": 1, "unanswered": 0},
        "de-en": {"exact_match": 100.0, "f1": 100.0, "count": 1, "unanswered": 0},
    }
    assert report["per_language"] == {"en": report["pairs"]["en-en"], "de": report["pairs"]["de-de"]}
    # Over pairs: XLT = mean(en-en, de-de), G-XLT = mean(en-de, de-en).
    assert report["xlt"] == {"exact_match": 25.0, "f1": approx(45.0), "pairs": 2}
    assert report["g_xlt"] == {"exact_match": 50.0, "f1": approx(90.0), "pairs": 2}
    # Pooled: XLT over its 3 examples, G-XLT over its 2, all over 5.
    assert report["xlt_pooled"] == {"exact_match": approx(100 / 3), "f1": approx(60.0), "count": 3, "unanswered": 1}
    assert report["g_xlt_pooled"] == {"exact_match": 50.0, "f1": approx(90.0), "count": 2, "unanswered": 0}
    assert report["pooled"] == {"exact_match": 40.0, "f1": approx(72.0), "count": 5, "unanswered": 1}
    # Rows: question language; columns: passage language; order of first appearance.
    assert report["matrix"] == {
        "languages": ["en", "de"],
        "exact_match": [[50.0, 0.0], [100.0, 0.0]],
        "f1": [[approx(90.0), approx(80.0)], [100.0, 0.0]],
    }


def test_mlqa_report_normalises_by_passage_language():
    report = score(EXAMPLES, PREDICTIONS, "mlqa")
    # en-de: German articles removed because the passage (answer) is German.
    assert report["pairs"]["en-de"]["exact_match"] == 100.0
    assert report["g_xlt"]["exact_match"] == 100.0
    # The question language plays no part: a German answer in an English passage keeps "die".
    swapped = [qa("1", "de", "en", "die Stadt")]
    assert score(swapped, {("1", "de", "en"): "Stadt"}, "mlqa")["pooled"]["exact_match"] == 0.0


def test_report_without_cross_language_pairs():
    report = score([qa("1", "en", "en", "x"), qa("1", "es", "es", "y")], {}, "squad")
    assert report["g_xlt"] is None and report["g_xlt_pooled"]["count"] == 0
    assert report["matrix"]["exact_match"] == [[0.0, None], [None, 0.0]]
    assert report["pooled"]["unanswered"] == 2


def test_example_without_gold_answers_is_named():
    with pytest.raises(ValueError, match=r"\('7', 'en', 'en'\) has no gold answers"):
        score([QAExample("7", "?", "c", (), "en", "en")], {}, "squad")


# --- command line ------------------------------------------------------------------------

def squad_file(path: Path, qas: list[tuple[str, list[str]]]) -> Path:
    """A SQuAD v1.1 file with one paragraph; qas = [(id, [answer texts])]."""
    context = " ".join(text for _, answers in qas for text in answers)
    paragraph = {
        "context": context,
        "qas": [
            {"id": i, "question": "?", "answers": [{"text": t, "answer_start": context.find(t)} for t in answers]}
            for i, answers in qas
        ],
    }
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [paragraph]}]}))
    return path


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_xqa.eval", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_cli_single_file(tmp_path):
    dataset = squad_file(tmp_path / "dev.json", [("a", ["Paris"]), ("b", ["el gato negro"]), ("c", ["x"])])
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"a": "Paris.", "b": "gato negro"}))

    squad = run_cli(dataset, predictions)
    assert squad.returncode == 0, squad.stderr
    result = json.loads(squad.stdout)
    assert list(result) == ["exact_match", "f1"]
    # a (1, 1); b: [el gato negro] vs [gato negro] -> (0, 0.8); c unanswered (0, 0)
    assert result == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 * 1.8 / 3)}
    assert "1 of 3 questions unanswered" in squad.stderr and ": c" in squad.stderr

    mlqa = run_cli(dataset, predictions, "--normalization", "mlqa", "--lang", "es")
    assert mlqa.returncode == 0, mlqa.stderr
    assert json.loads(mlqa.stdout) == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3)}

    no_lang = run_cli(dataset, predictions, "--normalization", "mlqa")
    assert no_lang.returncode == 2 and "needs --lang" in no_lang.stderr


def test_cli_matrix(tmp_path):
    (tmp_path / "set").mkdir()
    squad_file(tmp_path / "set" / "demo.en.json", [("a", ["the house"]), ("b", ["red"])])
    squad_file(tmp_path / "set" / "demo.es.json", [("a", ["la casa"]), ("b", ["rojo"])])
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({
        "en-en": {"a": "house", "b": "red"},
        "es-es": {"a": "casa", "b": "rojo"},
        "en-es": {"a": "la casa", "b": "azul"},
        "es-en": {"a": "house"},
    }))
    run = run_cli(tmp_path / "set", predictions, "--matrix", "--languages", "en,es", "--normalization", "mlqa")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["matrix"] == {
        "languages": ["en", "es"],
        "exact_match": [[100.0, 50.0], [50.0, 100.0]],
        "f1": [[100.0, 50.0], [50.0, 100.0]],
    }
    assert report["xlt"]["exact_match"] == 100.0 and report["g_xlt"]["exact_match"] == 50.0
    assert "1 of 8 questions unanswered" in run.stderr and "es-en:b" in run.stderr


@pytest.mark.parametrize(
    "predictions, message",
    [
        ({"a": 3}, "prediction for id a is int, not a string"),
        (["a"], "predictions must be a JSON object"),
    ],
)
def test_cli_names_bad_predictions(tmp_path, predictions, message):
    dataset = squad_file(tmp_path / "dev.json", [("a", ["x"])])
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(predictions))
    run = run_cli(dataset, path)
    assert run.returncode == 1 and message in run.stderr and str(path) in run.stderr


def test_cli_names_unknown_language_pair(tmp_path):
    (tmp_path / "set").mkdir()
    squad_file(tmp_path / "set" / "demo.en.json", [("a", ["x"])])
    path = tmp_path / "pred.json"
    path.write_text(json.dumps({"en-fr": {"a": "x"}}))
    run = run_cli(tmp_path / "set", path, "--matrix", "--languages", "en")
    assert run.returncode == 1 and "'en-fr' is not a pair" in run.stderr


# --- real data ---------------------------------------------------------------------------

needs_xquad = pytest.mark.skipif(
    not all((XQUAD / f"xquad.{lang}.json").is_file() for lang in XQUAD_LANGS),
    reason=f"XQuAD not found at {XQUAD} (set DIST_XQA_XQUAD)",
)


@needs_xquad
@pytest.mark.parametrize("normalization", ["squad", "mlqa"])
@pytest.mark.parametrize("lang", XQUAD_LANGS)
def test_xquad_gold_answers_score_100(lang, normalization):
    examples = read_gold(XQUAD / f"xquad.{lang}.json", lang)
    gold = {ex.key: ex.answers[0].text for ex in examples}
    report = score(examples, gold, normalization)
    assert report["pooled"] == {"exact_match": 100.0, "f1": 100.0, "count": 1190, "unanswered": 0}


def near_gold(gold: str, kind: int) -> str | None:
    """A prediction for the gold answer `gold`: equal to it up to case, ASCII punctuation,
    English articles and whitespace (kinds 1-3), or wrapped in non-ASCII punctuation, partly
    right, wrong, or missing (None)."""
    kind %= 8
    if kind == 0:
        return gold
    if kind == 1:
        return f"The {gold.upper()}!"
    if kind == 2:
        return f"  an {gold} ,  a "
    if kind == 3:
        return "".join(ch for ch in gold if ch not in string.punctuation).title().replace(" ", "\t ")
    if kind == 4:
        return f"«{gold}»"
    if kind == 5:
        return "completely wrong words"
    if kind == 6:
        return gold.split()[0] + " ,"
    return None


def near_gold_predictions(dataset: list[dict], shift: int = 0) -> dict[str, str]:
    """{question id: prediction} over every question of a SQuAD-format `data` list."""
    predictions = {}
    i = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                prediction = near_gold(qa["answers"][0]["text"], i + shift)
                i += 1
                if prediction is not None:
                    predictions[qa["id"]] = prediction
    return predictions


def xquad_data(lang: str) -> list[dict]:
    return json.loads((XQUAD / f"xquad.{lang}.json").read_text(encoding="utf-8"))["data"]


@needs_xquad
@pytest.mark.parametrize(
    "lang, normalization",
    [(lang, "squad") for lang in XQUAD_LANGS] + [(lang, "mlqa") for lang in ("en", "es", "de")],
)
def test_xquad_near_gold_predictions_score_as_the_official_scripts(lang, normalization):
    dataset = xquad_data(lang)
    by_id = near_gold_predictions(dataset)
    normalize = squad_normalize if normalization == "squad" else (lambda s: mlqa_normalize(s, lang))
    expected = official_evaluate(dataset, by_id, normalize)
    # the case discriminates: an identity normaliser would score it lower
    assert official_evaluate(dataset, by_id, lambda s: s)["exact_match"] < expected["exact_match"] - 20
    assert 0 < expected["exact_match"] < expected["f1"] < 100
    examples = read_gold(XQUAD / f"xquad.{lang}.json", lang)
    report = score(examples, {ex.key: by_id[ex.id] for ex in examples if ex.id in by_id}, normalization)
    assert report["pooled"] == {
        "exact_match": pytest.approx(expected["exact_match"], rel=1e-9),
        "f1": pytest.approx(expected["f1"], rel=1e-9),
        "count": 1190,
        "unanswered": 1190 - len(by_id),
    }


@needs_xquad
def test_cli_matrix_on_xquad_scores_as_the_official_script(tmp_path):
    # pair q-p: passage (and answers) in p; each question language shifts which questions get
    # which kind of prediction, so every cell of the matrix differs from its neighbours.
    data = {p: xquad_data(p) for p in XQUAD_LANGS}
    pairs, expected = {}, {"exact_match": [], "f1": []}
    for qi, q in enumerate(XQUAD_LANGS):
        row = {"exact_match": [], "f1": []}
        for p in XQUAD_LANGS:
            pairs[f"{q}-{p}"] = near_gold_predictions(data[p], shift=qi)
            official = official_evaluate(data[p], pairs[f"{q}-{p}"], squad_normalize)
            for metric in row:
                row[metric].append(pytest.approx(official[metric], rel=1e-9))
        for metric in row:
            expected[metric].append(row[metric])
    predictions = tmp_path / "near_gold.json"
    predictions.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    run = run_cli(XQUAD, predictions, "--matrix", "--languages", ",".join(XQUAD_LANGS))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    n = len(XQUAD_LANGS)
    missing = sum(1190 - len(answers) for answers in pairs.values())
    assert report["pooled"]["count"] == n * n * 1190 and report["pooled"]["unanswered"] == missing
    assert report["matrix"]["languages"] == XQUAD_LANGS
    assert report["matrix"]["exact_match"] == expected["exact_match"]
    assert report["matrix"]["f1"] == expected["f1"]
    diagonal = [expected["f1"][i][i].expected for i in range(n)]
    off_diagonal = [expected["f1"][i][j].expected for i in range(n) for j in range(n) if i != j]
    assert report["xlt"]["f1"] == pytest.approx(sum(diagonal) / n, rel=1e-9)
    assert report["g_xlt"]["f1"] == pytest.approx(sum(off_diagonal) / (n * n - n), rel=1e-9)
