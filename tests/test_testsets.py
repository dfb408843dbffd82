"""The data protocol: a training corpus with partial alignment, a dev split, and test sets
from other corpora (XQuAD-format parallel files with a language never trained on, MLQA-format
files, one per context x question pair), each scored on every question of its files exactly
as the official SQuAD v1.1 and MLQA v1 scripts score a prediction file.

The official scripts' logic is re-implemented below as the oracle (evaluate-v1.1.py and
mlqa_evaluation_v1.py, for the whitespace-tokenised languages used here), independently of
dist_xqa.eval. Real files throughout: the shared XQuAD data where it is present (skipped
otherwise), small generated SQuAD files everywhere.
"""
from __future__ import annotations

import collections
import copy
import json
import logging
import os
import re
import string
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from dist_xqa.config import ConfigError, load_config
from dist_xqa.eval.report import score
from dist_xqa.jobs import DISTILL_SET
from dist_xqa.prepare import prepare
from dist_xqa.prepared import run_test_sets

REPO = Path(__file__).resolve().parents[1]
XQUAD = Path(os.environ.get("DIST_XQA_XQUAD", REPO.parent / "shared" / "data" / "xquad"))
needs_xquad = pytest.mark.skipif(not (XQUAD / "xquad.en.json").is_file(),
                                 reason=f"XQuAD not found at {XQUAD} (set DIST_XQA_XQUAD)")

# ------------------------------------------------------------------ the official scripts


def squad_normalize(s: str) -> str:
    """evaluate-v1.1.py normalize_answer."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


MLQA_PUNCT = {chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")} | set(
    string.punctuation)
MLQA_ARTICLES = {"en": r"\b(a|an|the)\b", "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
                 "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"}


def mlqa_normalize(s: str, lang: str) -> str:
    """mlqa_evaluation_v1.py normalize_answer for the whitespace languages en/es/de."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in MLQA_PUNCT)
    s = re.sub(MLQA_ARTICLES[lang], " ", s)
    return " ".join(t for t in s.split() if t.strip())


def official_evaluate(dataset: list[dict], predictions: dict[str, str], normalize) -> dict:
    """The evaluate() loop both official scripts share: every question counts, a question
    without a prediction scores 0."""
    def f1(prediction, truth):
        p, t = normalize(prediction).split(), normalize(truth).split()
        common = collections.Counter(p) & collections.Counter(t)
        same = sum(common.values())
        if same == 0:
            return 0
        precision, recall = same / len(p), same / len(t)
        return 2 * precision * recall / (precision + recall)

    em = f1_total = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                truths = [a["text"] for a in qa["answers"]]
                em += max(float(normalize(predictions[qa["id"]]) == normalize(t)) for t in truths)
                f1_total += max(f1(predictions[qa["id"]], t) for t in truths)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1_total / total}


# ------------------------------------------------------------------------ data helpers


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def qas_of(doc: dict):
    return [qa for article in doc["data"] for p in article["paragraphs"] for qa in p["qas"]]


def xquad_articles(lang: str, articles: range) -> dict:
    doc = load(XQUAD / f"xquad.{lang}.json")
    return {"version": doc.get("version", "1.1"), "data": [doc["data"][i] for i in articles]}


def mlqa_pair(context: dict, question: dict) -> dict:
    """An MLQA-style file: the passages and answers of `context`, the questions of `question`."""
    questions = {qa["id"]: qa["question"] for qa in qas_of(question)}
    doc = copy.deepcopy(context)
    for qa in qas_of(doc):
        qa["question"] = questions[qa["id"]]
    return doc


def break_answer(doc: dict) -> str:
    """Make the first question unloadable (its answer is not in the passage); returns its id."""
    qa = doc["data"][0]["paragraphs"][0]["qas"][0]
    qa["answers"] = [{"text": "zzzz not in the passage zzzz", "answer_start": 0}]
    return qa["id"]


def crafted_predictions(doc: dict) -> dict[str, str]:
    """Predictions that exercise the normalisation: the gold answer with case, punctuation
    and an article changed, a partial answer, a wrong one, and one question left out."""
    predictions = {}
    for i, qa in enumerate(qas_of(doc)):
        gold = qa["answers"][0]["text"]
        kind = i % 5
        if kind == 0:
            predictions[qa["id"]] = f"The {gold.upper()}!"
        elif kind == 1:
            predictions[qa["id"]] = gold.split()[0] + " ,"
        elif kind == 2:
            predictions[qa["id"]] = "completely wrong words"
        elif kind == 3:
            predictions[qa["id"]] = f"«{gold}»."
    return predictions


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """A run trained on XQuAD articles 0-2 in en/es (split train 0-1, dev 2), tested on two
    other corpora: an XQuAD-format folder of article 3 in en, es and de (de never trained
    on) with one question broken in es, and an MLQA-format folder of article 5 (every
    context x question pair of en, de), one question broken in one file."""
    if not (XQUAD / "xquad.en.json").is_file():
        pytest.skip(f"XQuAD not found at {XQUAD}")
    tmp_path = tmp_path_factory.mktemp("protocol")
    train = tmp_path / "train"
    for lang in ("en", "es"):
        write(train / f"xquad.{lang}.json", xquad_articles(lang, range(0, 3)))
    xq = tmp_path / "xquad_test"
    for lang in ("en", "es", "de"):
        write(xq / f"xquad.{lang}.json", xquad_articles(lang, range(0, 5)))  # article 3 selected below
    broken_es = load(xq / "xquad.es.json")
    broken_parallel = break_answer({"data": broken_es["data"][3:4]})
    write(xq / "xquad.es.json", broken_es)
    mlqa = tmp_path / "mlqa_test"
    docs = {lang: xquad_articles(lang, range(5, 6)) for lang in ("en", "de")}
    broken_mlqa = None
    for c in ("en", "de"):
        for q in ("en", "de"):
            doc = mlqa_pair(docs[c], docs[q])
            if (c, q) == ("de", "en"):
                broken_mlqa = break_answer(doc)
            write(mlqa / f"test-context-{c}-question-{q}.json", doc)
    overrides = [
        f"run_dir={tmp_path / 'run'}", "data.source=squad", f"data.train.folder={train}",
        "data.train.pattern=xquad.{lang}.json", "data.train.languages=[en, es]",
        "data.train.split={train: [0, 2], dev: [2, 3]}", "model.max_length=192", "model.doc_stride=64",
        "model.tiny.vocab_size=2000",
        f"data.test=[{{name: xq, folder: {xq}, pattern: 'xquad.{{lang}}.json', languages: [en, es, de], "
        f"articles: [3, 4]}}, {{name: mlqa, folder: {mlqa}, format: mlqa, normalization: mlqa, "
        f"languages: [en, de]}}]",
    ]
    cfg = load_config(None, overrides)
    return cfg, prepare(cfg), {"xq": xq, "mlqa": mlqa, "broken_parallel": broken_parallel,
                              "broken_mlqa": broken_mlqa}


# ------------------------------------------------------------------------------- tests


@needs_xquad
def test_test_sets_hold_every_question_of_their_files_rejected_ones_included(protocol_run, caplog):
    cfg, prepared, where = protocol_run
    xq, mlqa = (prepared.test_set(name) for name in ("xq", "mlqa"))
    # parallel: every q x p pair of the 3 languages over article 3
    per_lang = len(qas_of({"data": load(where["xq"] / "xquad.en.json")["data"][3:4]}))
    assert xq.info["questions"] == len(xq.gold()) == 9 * per_lang
    assert xq.info["languages"] == ["en", "es", "de"] and xq.info["format"] == "parallel"
    # the broken es question is a miss in every pair with es passages or es questions (5 of 9)
    unanswerable = {key.split("|")[0] for key in xq.info["rejected"]}
    assert unanswerable == {where["broken_parallel"]} and len(xq.info["rejected"]) == 5
    assert all("answer" in reason for reason in xq.info["rejected"].values())
    assert xq.info["answerable"] == len(xq.examples()) == 9 * per_lang - 5
    # mlqa: each of the 4 files, every question; one file has a broken question
    mlqa_questions = sum(len(qas_of(load(p))) for p in where["mlqa"].glob("*.json"))
    assert mlqa.info["questions"] == len(mlqa.gold()) == mlqa_questions
    assert list(mlqa.info["rejected"]) == [f"{where['broken_mlqa']}|en|de"]  # question en, context de
    # the zero-shot language: in the test set, not in training
    assert "de" not in cfg.train_languages


@needs_xquad
@pytest.mark.parametrize("name", ["xq", "mlqa"])
def test_scores_equal_the_official_scripts_file_by_file(protocol_run, name):
    cfg, prepared, where = protocol_run
    (spec,) = [s for s in run_test_sets(cfg, prepared) if s.name == name]
    gold = prepared.test_set(name).gold()
    if name == "mlqa":
        files = {(q, c): load(where["mlqa"] / f"test-context-{c}-question-{q}.json")
                 for c in ("en", "de") for q in ("en", "de")}
    else:  # the official script scores a language's file: here its test articles
        files = {(lang, lang): {"data": load(where["xq"] / f"xquad.{lang}.json")["data"][3:4]}
                 for lang in ("en", "es", "de")}
    ours_predictions, expected = {}, {}
    for (q, c), doc in files.items():
        predictions = crafted_predictions(doc)
        ours_predictions.update({(i, q, c): text for i, text in predictions.items()})
        normalize = (lambda s, c=c: mlqa_normalize(s, c)) if name == "mlqa" else squad_normalize
        expected[f"{q}-{c}"] = official_evaluate(doc["data"], predictions, normalize)
    report = score(gold, ours_predictions, spec.normalization)
    for pair, official in expected.items():
        assert report["pairs"][pair]["exact_match"] == pytest.approx(official["exact_match"], abs=1e-9), pair
        assert report["pairs"][pair]["f1"] == pytest.approx(official["f1"], abs=1e-9), pair
    # the crafted predictions are neither all right nor all wrong, and the normaliser matters
    assert 10 < report["pooled"]["f1"] < 90
    identity = official_evaluate(next(iter(files.values()))["data"],
                                 crafted_predictions(next(iter(files.values()))), lambda s: s)
    assert identity["exact_match"] < expected[next(iter(expected))]["exact_match"]


@needs_xquad
def test_a_models_evaluation_counts_unanswerable_questions_as_misses(protocol_run):
    """The evaluator's whole path (features, decoding, scoring) against the oracle, on
    the predictions it wrote: the same numbers per file, rejected questions included."""
    from dist_xqa.models import build_model
    from dist_xqa.eval.stage import score_test_set

    cfg, prepared, where = protocol_run
    model = build_model(cfg.model, prepared.tokenizer(), seed=0)
    for spec in run_test_sets(cfg, prepared):
        section, predictions = score_test_set(model, spec, cfg, prepared, torch.device("cpu"), desc=spec.name)
        assert section["questions"] == len(prepared.test_set(spec.name).gold())
        assert section["zero_shot_languages"] == ["de"]  # both sets hold de; training had en, es
        assert set(section["unanswerable"]) == set(prepared.test_set(spec.name).info["rejected"])
        for key in section["unanswerable"]:
            assert key not in predictions
        # one file, re-scored by the oracle from the predictions the evaluator made
        if spec.name == "mlqa":
            q, c = "en", "de"
            doc = load(where["mlqa"] / f"test-context-{c}-question-{q}.json")
            normalize = lambda s: mlqa_normalize(s, c)  # noqa: E731
        else:
            q = c = "es"
            doc = {"data": load(where["xq"] / "xquad.es.json")["data"][3:4]}
            normalize = squad_normalize
        mine = {k.split("|")[0]: v for k, v in predictions.items() if k.endswith(f"|{q}|{c}")}
        official = official_evaluate(doc["data"], mine, normalize)
        assert section["pairs"][f"{q}-{c}"]["f1"] == pytest.approx(official["f1"], abs=1e-9)
        assert section["pairs"][f"{q}-{c}"]["count"] == len(qas_of(doc))


@needs_xquad
def test_a_test_set_added_later_is_prepared_without_touching_the_training_sets(protocol_run):
    cfg, prepared, where = protocol_run
    stamp = (prepared.root / "prepared.json").stat().st_mtime_ns
    features_stamp = (prepared.root / "sets" / DISTILL_SET).stat().st_mtime_ns
    extra = f"{{name: late, folder: {where['xq']}, pattern: 'xquad.{{lang}}.json', languages: [en], articles: [4, 5]}}"
    overrides = [o for o in _overrides_of(cfg) if not o.startswith("data.test=")]
    tests = (f"data.test=[{{name: xq, folder: {where['xq']}, pattern: 'xquad.{{lang}}.json', "
             f"languages: [en, es, de], articles: [3, 4]}}, {{name: mlqa, folder: {where['mlqa']}, "
             f"format: mlqa, normalization: mlqa, languages: [en, de]}}, {extra}]")
    later = prepare(load_config(None, overrides + [tests]))
    assert later.test_set("late").info["languages"] == ["en"]
    assert (prepared.root / "prepared.json").stat().st_mtime_ns == stamp
    assert (prepared.root / "sets" / DISTILL_SET).stat().st_mtime_ns == features_stamp


def _overrides_of(cfg) -> list[str]:
    d = cfg.data.train
    return [f"run_dir={cfg.run_path}", "data.source=squad", f"data.train.folder={d.folder}",
            f"data.train.pattern={d.pattern}", "data.train.languages=[en, es]",
            "data.train.split={train: [0, 2], dev: [2, 3]}", "model.max_length=192", "model.doc_stride=64",
            "model.tiny.vocab_size=2000"]


def squad_doc(lang: str, ids: list[str], per_article: int = 5, leave_out: frozenset = frozenset()) -> dict:
    articles = []
    for a in range(0, len(ids), per_article):
        qas, context = [], f"Passage {a} in {lang}. "
        for i in ids[a:a + per_article]:
            if i in leave_out:
                continue
            answer = f"answer{i}{lang}"
            qas.append({"id": i, "question": f"What is {i} in {lang}?",
                        "answers": [{"text": answer, "answer_start": len(context)}]})
            context += f"{answer} is the word. "
        articles.append({"title": f"t{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": articles}


def test_ids_missing_in_one_language_stay_in_the_other_languages_pairs(tmp_path, caplog):
    """10% of the ids are missing in de: the en/es pairs keep them; only pairs with de lose them."""
    ids = [f"q{i:02d}" for i in range(40)]
    missing_de = set(ids[::10])  # 4 of 40
    folder = tmp_path / "corpus"
    for lang in ("en", "es", "de"):
        write(folder / f"c.{lang}.json", squad_doc(lang, ids, leave_out=frozenset(missing_de if lang == "de" else ())))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source=squad", f"data.train.folder={folder}",
                             "data.train.split={train: [0, 6], dev: [7, 8], test: [6, 7]}",
                             "model.max_length=64", "model.doc_stride=16", "model.tiny.vocab_size=300"])
    with caplog.at_level(logging.WARNING):
        prepared = prepare(cfg)
    assert "language 'de' lacks 4 of 40" in caplog.text
    train_ids = ids[:30]  # articles 0-5, 5 ids each
    n_full, n_part = sum(i not in missing_de for i in train_ids), sum(i in missing_de for i in train_ids)
    assert n_part == 3
    distill = prepared.examples(DISTILL_SET)
    # every (q, p) pair: 9 for an id in all three languages, 4 (en/es only) for an id de lacks
    assert len(distill) == 9 * n_full + 4 * n_part
    kept = {(ex.question_lang, ex.context_lang) for ex in distill if ex.id in missing_de}
    assert kept == {("en", "en"), ("en", "es"), ("es", "en"), ("es", "es")}
    # branch es (with the English branch added): p in {es, en}, q in every language having the id
    branch_es = prepared.examples("branch_es")
    assert len(branch_es) == 6 * n_full + 4 * n_part
    branch_de = prepared.examples("branch_de")
    assert len(branch_de) == 6 * n_full + 2 * n_part  # de lacks them: only their en-passage pairs remain
    # the split test set (articles 6: q30-q34): every pair both files have; q30 lacks its 5 pairs with de
    test = prepared.test_set("test")
    assert len(test.gold()) == 9 * 5 - 5 * 1


def test_test_set_problems_are_refused_before_preparing_naming_the_set_and_path(tmp_path):
    ids = [f"q{i}" for i in range(10)]
    folder = tmp_path / "corpus"
    for lang in ("en", "es", "de"):
        write(folder / f"c.{lang}.json", squad_doc(lang, ids))
    test_folder = tmp_path / "mlqa"
    write(test_folder / "test-context-en-question-en.json", squad_doc("en", ids))
    (test_folder / "test-context-en-question-de.json").mkdir()  # matches, but cannot be read as a file
    base = [f"run_dir={tmp_path / 'run'}", "data.source=squad", f"data.train.folder={folder}",
            "model.max_length=64", "model.doc_stride=16", "model.tiny.vocab_size=300"]

    def refused(test: str) -> str:
        with pytest.raises(ConfigError) as info:
            prepare(load_config(None, [*base, f"data.test=[{test}]"]))
        assert not (tmp_path / "run" / "prepared" / "prepared.json").exists()
        return str(info.value)

    message = refused(f"{{name: mlqa_test, folder: {test_folder}, format: mlqa, languages: [en, es]}}")
    assert "test set 'mlqa_test'" in message and str(test_folder) in message
    assert "test-context-en-question-es.json" in message and "question language es" in message
    message = refused(f"{{name: mlqa_test, folder: {test_folder}, format: mlqa, languages: [en, de]}}")
    assert "test set 'mlqa_test'" in message and "cannot read" in message
    assert "test-context-en-question-de.json" in message
    message = refused(f"{{name: xq, folder: {tmp_path / 'nowhere'}, languages: [en]}}")
    assert "test set 'xq'" in message and "nowhere" in message
