"""benchmarks/quality.py's bookkeeping over files: when a run's scores count (collect), the
aggregate over seeds (mean and sample std), the Markdown table, its section of RESULTS.md,
and that every row is a config the trainer accepts."""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import pytest

from dist_xqa.config import load_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = quality  # dataclasses look their module up there
_spec.loader.exec_module(quality)
orderings = quality.orderings


def section(f1: dict[str, float], p_t_alone: dict | None = None) -> dict:
    langs = list(f1)
    per_language = {lang: {"exact_match": v - 2, "f1": v} for lang, v in f1.items()}
    out = {"per_language": per_language,
           "xlt": {"exact_match": statistics.fmean(f1.values()) - 2, "f1": statistics.fmean(f1.values())},
           "g_xlt": {"exact_match": 1.0, "f1": 3.0}, "pooled": {"exact_match": 0, "f1": 0},
           "matrix": {"languages": langs, "f1": [[f1[q] if q == p else 3.0 for p in langs] for q in langs]}}
    if p_t_alone:
        out["p_T_alone"] = section(p_t_alone)
    return out


def finished_run(run_dir: Path, models: dict[str, dict], sets=("test",), write_summary=True) -> None:
    """A run directory as the trainer leaves it: DONE.json of each model, then the summary."""
    for name in models:
        kind, _, short = name.partition("_")
        directory = run_dir / ({"teacher": "teachers", "model": "models"}[kind] + "/" + short
                               if kind in ("teacher", "model") else name)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "DONE.json").write_text("{}")
    if write_summary:
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        summary = {name: {"selection": {}, "test_sets": {s: sec for s in sets}} for name, sec in models.items()}
        (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))


def test_collect_counts_a_run_only_when_every_model_is_scored_on_every_set(tmp_path):
    models = {"teacher_en": section({"en": 10.0}), "student": section({"en": 20.0})}
    finished_run(tmp_path / "ok", models)
    got = quality.collect(tmp_path / "ok", ["test"])
    assert sorted(got["models"]) == ["student", "teacher_en"]
    assert got["models"]["student"]["test_sets"]["test"]["per_language"]["en"]["f1"] == 20.0

    finished_run(tmp_path / "none", models, write_summary=False)  # killed before the evaluation
    assert quality.collect(tmp_path / "none", ["test"]) is None
    assert quality.collect(tmp_path / "ok", ["test", "xquad"]) is None  # a test set missing

    finished_run(tmp_path / "partial", {"student": section({"en": 20.0})})
    (tmp_path / "partial" / "teachers" / "de").mkdir(parents=True)  # a model the summary lacks
    (tmp_path / "partial" / "teachers" / "de" / "DONE.json").write_text("{}")
    assert quality.collect(tmp_path / "partial", ["test"]) is None

    finished_run(tmp_path / "stale", models)  # a model saved again after the summary
    summary = tmp_path / "stale" / "eval" / "summary.json"
    os.utime(summary, (summary.stat().st_mtime - 100,) * 2)
    assert quality.collect(tmp_path / "stale", ["test"]) is None


def test_collect_adds_xsta_target_side_alone(tmp_path):
    finished_run(tmp_path, {"student": section({"en": 30.0, "de": 20.0}, p_t_alone={"en": 25.0, "de": 15.0})})
    models = quality.collect(tmp_path, ["test"])["models"]
    assert models["student"]["test_sets"]["test"]["per_language"]["de"]["f1"] == 20.0
    assert models["student_p_T_alone"]["test_sets"]["test"]["per_language"]["de"]["f1"] == 15.0


def test_collect_records_the_runs_own_files_relative_to_it(tmp_path):
    sec = section({"en": 30.0})
    sec["inference"] = {"oracle_translation": f"{tmp_path}/data/demo.en.json"}
    finished_run(tmp_path, {"student": sec})
    models = quality.collect(tmp_path, ["test"])["models"]
    assert models["student"]["test_sets"]["test"]["inference"]["oracle_translation"] == "data/demo.en.json"


def record(row: str, seed: int, models: dict, reused=()) -> dict:
    r = quality.ROWS[row]
    return {"row": row, "seed": seed, "label": r.label, "group": r.group, "overrides": list(r.overrides),
            "wall_s": 60.0, "reused": list(reused), "models": {m: {"test_sets": {"test": sec}} for m, sec in models.items()}}


def test_aggregate_mean_and_sample_std_over_seeds_and_the_table(tmp_path):
    records = {}
    for seed, (student, teacher) in enumerate([(20.0, 10.0), (24.0, 12.0), (22.0, 14.0)]):
        records["lbmrc_imp", seed] = record("lbmrc_imp", seed, {"teacher_en": section({"en": teacher, "es": 1.0}),
                                                                 "student": section({"en": student, "es": 5.0})})
        records["lbmrc_hyper", seed] = record("lbmrc_hyper", seed, {"teacher_en": section({"en": teacher, "es": 1.0}),
                                                                     "student": section({"en": 1.0, "es": 2.0})},
                                              reused=["teacher_en"])
    records["zero_shot", 0] = record("zero_shot", 0, {"model_zero_shot": section({"en": 9.0, "es": 1.0})})
    q = quality.aggregate(records, list(quality.ROWS))
    student = q["rows"]["lbmrc_imp"]["mean_std"]["student"]["test"]
    assert student["en"]["f1"] == {"mean": 22.0, "std": pytest.approx(2.0), "n": 3}
    assert student["en"]["exact_match"]["mean"] == 20.0
    assert student["xlt"]["f1"]["mean"] == pytest.approx(13.5)
    assert q["rows"]["lbmrc_imp"]["mean_std"]["teacher_en"]["test"]["en"]["f1"]["std"] == pytest.approx(2.0)
    # a row's table lines: the models it trained itself (teachers first), not reused teachers
    assert list(q["rows"]["lbmrc_imp"]["mean_std"]) == ["teacher_en", "student"]
    assert list(q["rows"]["lbmrc_hyper"]["mean_std"]) == ["student"]
    assert q["rows"]["zero_shot"]["mean_std"]["model_zero_shot"]["test"]["en"]["f1"]["std"] is None

    table = quality.markdown_tables(q)
    lines = table.splitlines()
    assert "| row | model | n | en F1 | es F1 | XLT F1 | G-XLT F1 | XLT EM |" in lines
    assert "| lbmrc_imp | student | 3 | 22.0 ± 2.0 | 5.0 ± 0.0 | 13.5 ± 1.0 | 3.0 ± 0.0 | 11.5 ± 1.0 |" in lines
    assert "| zero_shot | model_zero_shot | 1 | 9.0 | 1.0 | 5.0 | 3.0 | 3.0 |" in lines
    # controls first, then the LBMRC rows
    assert table.index("| zero_shot |") < table.index("| lbmrc_imp |")


def test_the_heatmaps_best_student_is_a_methods_not_a_controls():
    _spec = importlib.util.spec_from_file_location("plot_quality", ROOT / "benchmarks" / "plot_quality.py")
    plot = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(plot)  # no matplotlib needed to choose the panels
    records = {("lbmrc_imp", 0): record("lbmrc_imp", 0, {"teacher_en": section({"en": 30.0, "es": 30.0}),
                                                         "student": section({"en": 12.0, "es": 8.0})}),
               ("lbmrc_hyper", 0): record("lbmrc_hyper", 0, {"student": section({"en": 11.0, "es": 7.0})}),
               ("lbmrc_kd0", 0): record("lbmrc_kd0", 0, {"student": section({"en": 14.0, "es": 9.0})}),
               ("xsta", 0): record("xsta", 0, {"student": section({"en": 8.0, "es": 8.0})}),
               ("lbmrc_top8", 0): record("lbmrc_top8", 0, {"student": section({"en": 13.0, "es": 9.0})})}
    records["lbmrc_top8", 0]["group"] = "lbmrc"  # as its records were written before the topk group
    rows = quality.aggregate(records, list(quality.ROWS))["rows"]
    assert rows["lbmrc_top8"]["group"] == "topk", "the group as the code defines it now"
    # kd0 (a control) scores highest and a teacher higher still, then a top-k store's
    # student (the method with a storage option): none of them is the best student
    assert plot.best_student(rows, "test") == ("lbmrc_imp", "student")
    del rows["lbmrc_imp"]
    assert plot.best_student(rows, "test") == ("lbmrc_hyper", "student")


def test_orderings_pair_seeds_read_the_claimed_column_and_judge_against_the_spread():
    # XLT = mean of en and es. LBMRC: 24, 25, 26; mixMRC 12, 13, 14: +12 each seed, spread 1.
    imp = [{"en": 24.0, "es": 24.0}, {"en": 25.0, "es": 25.0}, {"en": 26.0, "es": 26.0}]
    rows = {"mixmrc": ("model_mixmrc", [{"en": 12.0, "es": 12.0}, {"en": 13.0, "es": 13.0}, {"en": 14.0, "es": 14.0}]),
            "lbmrc_kd0": ("student", [{"en": 25.0, "es": 25.0}, {"en": 24.0, "es": 24.0}, {"en": 26.5, "es": 26.5}]),
            # without es: worse XLT, but *better* es F1 on every seed by 5 (the es column is read, not XLT)
            "lbmrc_wo_es": ("student", [{"en": 10.0, "es": 29.0}, {"en": 10.0, "es": 30.0}, {"en": 10.0, "es": 31.0}])}
    records = {}
    for seed in range(3):
        records["lbmrc_imp", seed] = record("lbmrc_imp", seed, {"student": section(imp[seed])})
        for row, (model, scores) in rows.items():
            records[row, seed] = record(row, seed, {model: section(scores[seed])})
    records["zero_shot", 1] = record("zero_shot", 1, {"model_zero_shot": section({"en": 3.0, "es": 5.0})})
    q = quality.aggregate(records, list(quality.ROWS))
    found = {r["claim"]: r for r in orderings.orderings(q, "test")}

    assert set(found) == {"LBMRC > mixMRC", "mixMRC > zero-shot", "LBMRC > its student with lambda_kd = 0",
                          "the es teacher helps es"}, "claims without both lines are left out"
    mix = found["LBMRC > mixMRC"]
    assert mix["diffs"] == [12.0, 12.0, 12.0] and mix["spread"] == pytest.approx(1.0) and mix["verdict"] == "holds"
    kd0 = found["LBMRC > its student with lambda_kd = 0"]
    assert kd0["diffs"] == [-1.0, 1.0, -0.5] and kd0["verdict"] == "within spread"
    wo_es = found["the es teacher helps es"]
    assert wo_es["column"] == "es" and wo_es["diffs"] == [-5.0, -5.0, -5.0] and wo_es["verdict"] == "reversed"
    zero = found["mixMRC > zero-shot"]  # paired on seed 1 only: mixMRC 13 against zero-shot's XLT 4
    assert zero["seeds"] == ["1"] and zero["diffs"] == [9.0] and zero["verdict"] == "1 seed"

    table = orderings.markdown(list(found.values()), "test")
    assert "| LBMRC > mixMRC | XLT | `lbmrc_imp/student` 25.0 | `mixmrc/model_mixmrc` 13.0 | +12.0, +12.0, +12.0 " \
           "| +12.0 | 1.0 | holds |" in table.splitlines()


def test_profiles_keep_placeholders_that_resolve_to_this_machines_paths(monkeypatch):
    monkeypatch.setenv("DIST_XQA_XQUAD", "/data/xq")
    profile = quality.PROFILES["xquad", "cpu"]
    assert "data.train.folder={xquad}" in profile and "model.name={minilm}" in profile
    assert not any("=/" in item for item in profile), "no machine path in what records keep"
    resolved = quality.resolve(["data.train.folder={xquad}", "data.test.0.folder={xquad}", "seed=1"])
    assert resolved == ["data.train.folder=/data/xq", "data.test.0.folder=/data/xq", "seed=1"]


def test_results_section_replaces_its_own_block_only(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Profiling\n\nother text\n")
    quality.write_section(md, "demo-cpu", "Quality: demo", "table one")
    quality.write_section(md, "xquad-cpu", "Quality: xquad", "table x")
    quality.write_section(md, "demo-cpu", "Quality: demo", "table two")
    text = md.read_text()
    assert text.startswith("# Results\n\n## Profiling\n\nother text\n")
    assert "table two" in text and "table one" not in text and "table x" in text
    assert text.count("## Quality: demo") == 1


def test_every_row_is_a_config_the_trainer_accepts_and_reuse_sources_run_first():
    names = list(quality.ROWS)
    for name, row in quality.ROWS.items():
        cfg = load_config(ROOT / "configs" / "demo.yaml", list(row.overrides))
        if row.reuse_from:
            assert names.index(row.reuse_from) < names.index(name)
            assert quality.shared_models(cfg), f"{name} reuses nothing of {row.reuse_from}"
    assert quality.select_rows("core,zero_shot") == [n for n in names if n in quality.ROW_SETS["core"]]
    with pytest.raises(SystemExit, match="unknown row"):
        quality.select_rows("lbmrc_imp,nonsense")


def test_the_record_of_a_run_holds_the_mean_teacher_weights_its_student_logged(tmp_path):
    """imp's weight of each teacher, averaged over the student's logged steps (every event
    file: a resumed run writes its own), for the claims that cite them."""
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.runs import teacher_weights

    assert teacher_weights(tmp_path) is None  # no TensorBoard log: a run without imp
    for run, steps in (("first", range(0, 2)), ("resumed", range(2, 4))):
        writer = SummaryWriter(str(tmp_path / "tb" / "student"), filename_suffix=run)
        for step in steps:
            writer.add_scalar("student/teacher_weight/en", 0.1 * (step + 1), step)
            writer.add_scalar("student/teacher_weight/de", 0.5, step)
            writer.add_scalar("student/kd", 9.0, step)
        writer.close()
    assert teacher_weights(tmp_path) == {"de": 0.5, "en": pytest.approx(0.25)}


def test_rows_read_their_sources_store_exactly_when_it_holds_their_logits():
    """A row on its source's teachers reads that row's logit store unless its logits would
    differ: another top-k or dtype, placebo-shuffled rows, another teacher set."""
    demo = ROOT / "configs" / "demo.yaml"
    source = load_config(demo, list(quality.ROWS[quality.LBMRC].overrides))
    sharing = {name for name, row in quality.ROWS.items() if row.reuse_from == quality.LBMRC
               and quality.shares_store(load_config(demo, list(row.overrides)), source)}
    assert sharing == {"lbmrc_kd0", "lbmrc_hyper", "lbmrc_imp_s+1"}


def test_teacher_forwards_sum_the_producers_last_heartbeats(tmp_path):
    from benchmarks.runs import teacher_forwards
    from dist_xqa.waiting import Heartbeat

    assert teacher_forwards(tmp_path) is None  # no producers: a baseline
    for teacher, part, rows in (("en", "heartbeat.json", 40), ("de", "heartbeat.0of2.json", 24),
                                ("de", "heartbeat.1of2.json", 16)):
        beat = Heartbeat(tmp_path / "logits" / teacher / part, f"producer_{teacher}", interval_s=0)
        beat.beat(1, rows_computed=rows - 8, shards_written=1)
        beat.beat(2, rows_computed=rows, shards_written=2, force=True)
    assert teacher_forwards(tmp_path) == {"rows_computed": 80, "shards_written": 6}
