"""X-STA and self-distillation end to end, as users run them: the README's command with
configs/demo_xsta.yaml / configs/demo_skd.yaml under the deepspeed launcher on 2 CPU ranks
(the demo shrunk by overrides), into a temporary run directory. Each run must finish, be
evaluated on every test set (X-STA with translate-test on the oracle English file; SKD's
phase-1 model and its student), have learnt something (its logged loss fell and its test F1
beats an untrained model's, where that margin is robust at this size), and a rerun of the
same command must redo nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForQuestionAnswering

from dist_xqa.logits import hash_checkpoint
from dist_xqa.strategies.xsta_model import load_xsta
from tests.test_pipeline_e2e import LANGUAGES, kill_job_when, launch, untrained_f1
from tests.test_skd import scalars

# 30 demo articles at length 96: about a minute of training per run on 2 idle cores
SHRINK = ("data.demo_articles=30", "model.max_length=96", "model.doc_stride=32")


def reports(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "eval").glob("*.json") if p.stem != "summary"}


def stamps(*paths: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def assert_fell(history: list[float], what: str) -> None:
    """A logged loss fell: the mean of its last three values well below that of its first
    three (single steps are noisy)."""
    assert len(history) >= 6 and sum(history[-3:]) < 0.85 * sum(history[:3]), (what, history)


def assert_scored_on_every_pair(section: dict) -> None:
    assert set(section["per_language"]) == set(LANGUAGES)
    assert len(section["matrix"]["f1"]) == len(LANGUAGES) and section["g_xlt"] is not None


@pytest.mark.slow
def test_xsta_demo_end_to_end_with_translate_test(tmp_path):
    run_dir = tmp_path / "xsta"
    command = ("--config", "configs/demo_xsta.yaml", *SHRINK, "student.epochs=3")
    first = launch(run_dir, *command)

    found = reports(run_dir)
    assert list(found) == ["student"]
    report = found["student"]
    assert set(report["test_sets"]) == {"test"}  # the demo's one test set: its corpus's test split
    section = report["test_sets"]["test"]
    assert_scored_on_every_pair(section)
    inference = section["inference"]
    answerable = section["questions"] - len(section["unanswerable"])
    assert inference["translate_test_examples"] > 0
    assert inference["translate_test_examples"] + inference["p_T_examples"] == answerable
    assert inference["oracle_translation"] == str(run_dir / "data" / "demo.en.json")
    assert inference["translate_test_scores"].startswith("p~_T = (p_T|S + p_T) / 2")
    assert_scored_on_every_pair(section["p_T_alone"])
    assert "oracle translation" in first.stdout and "student (p_T alone)" in first.stdout

    logged = scalars(run_dir / "tb")
    for part in ("total", "mrc_src", "mrc_tgt", "teacher_guided", "sentence", "token"):
        assert logged.get(f"student/loss/{part}"), part
    assert_fell(logged["student/loss/total"], "student/loss/total")
    # the folder is the Hugging Face QA model, and the whole X-STA model through load_xsta
    assert type(AutoModelForQuestionAnswering.from_pretrained(run_dir / "student")).__name__ == "BertForQuestionAnswering"
    assert load_xsta(run_dir / "student").encoder.share_index == 0  # layer 1 of 2: two thirds, rounded
    # p_T alone is what the saved Hugging Face model answers with
    baseline = untrained_f1(run_dir)
    assert section["p_T_alone"]["pooled"]["f1"] > baseline + 2, (section["p_T_alone"]["pooled"], baseline)
    # Translate-test (the calibrated average on the examples with a source version) is the
    # row's score, not p_T alone under another name. It is not bounded below here: on this
    # shrunk run it scores at the untrained model's level (XLT F1 4.1 against p_T alone's
    # 7.8, the same with the code before the review's fixes), and on the demo below p_T
    # alone on all 3 seeds (benchmarks/results/quality_demo): an open question of the
    # calibration head, not of the scoring this test checks.
    assert section["pooled"] != section["p_T_alone"]["pooled"]
    assert section["p_T_alone"]["pooled"]["count"] == section["pooled"]["count"] == section["questions"]

    # The same command again trains and scores nothing.
    model = run_dir / "student" / "model.safetensors"
    before = stamps(model, run_dir / "student" / "xsta.safetensors", run_dir / "eval" / "student.json")
    launch(run_dir, *command)
    assert stamps(*before) == before

    # Without translate-test: the finished model rescored, not retrained.
    launch(run_dir, *command, "--stage", "evaluate", "strategy.xsta.translate_test=false")
    assert stamps(model) == {model: before[model]}
    rescored = reports(run_dir)["student"]["test_sets"]["test"]
    assert rescored["inference"]["translate_test_examples"] == 0
    assert rescored["inference"]["p_T_because"] == "strategy.xsta.translate_test is false"
    assert rescored["pooled"] == section["p_T_alone"]["pooled"] and "p_T_alone" not in rescored


@pytest.mark.slow
def test_skd_demo_killed_at_the_epoch_boundary_resumes_and_is_evaluated(tmp_path):
    run_dir = tmp_path / "skd"
    command = ("--config", "configs/demo_skd.yaml", *SHRINK, "teacher.epochs=2", "student.epochs=2")
    # Killed (every rank, no clean-up) at the epoch boundary, as soon as generation 1's
    # teacher is saved; the same command resumes the student inside generation 1 with that
    # teacher (not a new snapshot of its weights, not generation 0's store) and finishes.
    generation1 = run_dir / "skd" / "teacher_gen1" / "config.json"
    kill_job_when(generation1, run_dir, *command)
    assert not (run_dir / "student" / "DONE.json").exists(), "killed too late: the student had finished"
    snapshot = hash_checkpoint(generation1.parent)
    launch(run_dir, *command)
    assert "student (skd): resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    # generation 1's logits came from the snapshot taken before the kill, not from one of
    # the resumed student's weights; the snapshot itself is gone once the student finished
    assert json.loads((run_dir / "logits" / "manifest.json").read_text())["teachers"] == {"self": snapshot}
    assert not generation1.parent.exists()

    found = reports(run_dir)
    assert set(found) == {"model_skd_phase1", "student"}
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert set(summary) == set(found)
    for report in found.values():
        assert set(report["test_sets"]) == {"test"}
        assert_scored_on_every_pair(report["test_sets"]["test"])
        assert "inference" not in report["test_sets"]["test"]  # translate-test is X-STA's alone

    # Both phases learnt: their logged losses fell (at this size their test F1 is too close
    # to an untrained model's to bound robustly), and the student was distilled: the KL
    # against its teacher generation counted, weighted by the teacher's mAP@k.
    logged = scalars(run_dir / "tb")
    assert_fell(logged["model/skd_phase1/loss"], "phase 1")
    assert_fell(logged["student/loss/ce"], "phase 2 cross-entropy")
    assert any(kl > 0 for kl in logged["student/loss/kl"]), logged["student/loss/kl"]
    alphas = logged["student/alpha_kl"]
    assert all(0 <= alpha <= 1 for alpha in alphas) and any(alpha > 0 for alpha in alphas), alphas
    # the teacher of the last epoch was that epoch's generation of the student
    assert json.loads((run_dir / "logits" / "manifest.json").read_text())["generation"] == 1

    before = stamps(run_dir / "models" / "skd_phase1" / "model.safetensors", run_dir / "student" / "model.safetensors",
                    run_dir / "eval" / "student.json", run_dir / "eval" / "model_skd_phase1.json")
    launch(run_dir, *command)
    assert stamps(*before) == before
