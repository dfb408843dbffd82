"""benchmarks/pipeline.py's pure parts on finished-run directories made of real files
(DONE.json with set times, TensorBoard event files, eval/summary.json, shard files): the
figures of a run, their aggregation over seeds with the per-seed ratios and targets, and
the table written between its markers in a RESULTS.md."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pipeline_bench", ROOT / "benchmarks" / "pipeline.py")
pipeline = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = pipeline
_spec.loader.exec_module(pipeline)
from benchmarks import runs  # noqa: E402  (importable once pipeline.py put the repository on sys.path)

T0 = 1_800_000_000.0  # the launch, wall clock
TEACHERS = ("en", "es", "de")


def set_time(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def fake_run(run_dir: Path, *, teachers_done: list[float], first_step: float, student_done: float,
             shard_times: list[float], f1: float, speeds: list[tuple[int, float]]) -> None:
    """A run directory as the trainer leaves it, its files' times relative to T0."""
    from torch.utils.tensorboard import SummaryWriter

    for teacher, done in zip(TEACHERS, teachers_done):
        path = run_dir / "teachers" / teacher / "DONE.json"
        path.parent.mkdir(parents=True)
        path.write_text("{}")
        set_time(path, T0 + done)
    done = run_dir / "student" / "DONE.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    set_time(done, T0 + student_done)
    writer = SummaryWriter(str(run_dir / "tb" / "student"))
    writer.add_scalar("student/nll", 1.0, 0, walltime=T0 + first_step)
    for step, value in speeds:
        writer.add_scalar("samples_per_second", value, step, walltime=T0 + first_step + step)
    writer.close()
    for i, when in enumerate(shard_times):
        shard = run_dir / "logits" / TEACHERS[i % 3] / f"shard_{i:06d}.safetensors"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(b"x" * 10)
        set_time(shard, T0 + when)
    section = lambda v: {"test_sets": {"test": {"xlt": {"f1": v, "exact_match": v - 1}}}}  # noqa: E731
    summary = {"student": section(f1), **{f"teacher_{t}": section(10.0 + i) for i, t in enumerate(TEACHERS)}}
    path = run_dir / "eval" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    set_time(path, T0 + student_done + 30)


def test_a_runs_figures_come_from_its_files(tmp_path):
    fake_run(tmp_path, teachers_done=[100, 300, 200], first_step=360, student_done=500, shard_times=[310, 340, 350],
             f1=19.5, speeds=[(0, 1.0), (10, 40.0), (20, 60.0)])
    figures = pipeline.measure(tmp_path, T0, T0 + 560, peak_logit_bytes=1234, loads=[2.0, 4.0], precomputed=True)
    assert figures["wall_s"] == 500 and figures["total_s"] == 560 and figures["teachers_s"] == 300
    assert figures["first_student_step_s"] == 60, "from the last teacher's DONE.json to the first scalar"
    assert figures["precompute_s"] == 50, "from the last teacher to the newest shard"
    assert figures["samples_per_s"] == 50, "step 0 (start-up) left out"
    assert figures["f1"] == 19.5 and figures["teachers_f1"] == {"de": 12.0, "en": 10.0, "es": 11.0}
    assert figures["peak_logit_bytes"] == 1234 and figures["load_1min"] == {"mean": 3.0, "max": 4.0}
    streamed = pipeline.measure(tmp_path, T0, T0 + 560, 1234, [2.0], precomputed=False)
    assert streamed["precompute_s"] is None, "shards written all along: no precompute time"


def test_an_unscored_run_gives_no_figures(tmp_path):
    fake_run(tmp_path, teachers_done=[1, 2, 3], first_step=4, student_done=5, shard_times=[], f1=1.0, speeds=[])
    (tmp_path / "eval" / "summary.json").unlink()
    assert pipeline.measure(tmp_path, T0, T0 + 9, 0, [], precomputed=True) is None


def record(mode: str, seed: int, wall: float, peak: int, first: float, precompute: float | None, f1: float) -> dict:
    return {"mode": mode, "seed": seed, "wall_s": wall, "total_s": wall + 30, "cpu_s": wall / 2, "teachers_s": 100.0,
            "first_student_step_s": first, "precompute_s": precompute, "peak_logit_bytes": peak,
            "samples_per_s": 50.0, "f1": f1, "teachers_f1": {"en": 10.0}, "load_1min": {"mean": 3.0, "max": 5.0}}


def test_aggregation_pairs_seeds_and_checks_the_targets(tmp_path):
    records = {("sequential", 0): record("sequential", 0, 1000, 10_000, 200, 180, 19.0),
               ("streamed", 0): record("streamed", 0, 800, 900, 10, None, 19.5),
               ("sequential", 1): record("sequential", 1, 1000, 10_000, 200, 200, 18.0),
               ("streamed", 1): record("streamed", 1, 900, 1100, 30, None, 18.5),
               ("sequential", 2): record("sequential", 2, 1100, 10_000, 200, 190, 18.0),  # no pair yet
               ("streamed_cache", 1): record("streamed_cache", 1, 600, 9_000, 12, None, 17.0)}
    result = pipeline.aggregate(records)
    assert result["sequential"]["seeds"] == [0, 1, 2] and result["streamed"]["seeds"] == [0, 1]
    assert result["sequential"]["wall_s"] == [1000, 1000, 1100] and result["streamed"]["f1"] == [19.5, 18.5]
    assert result["sequential"]["precompute_s"] == [180, 200, 190] and "precompute_s" not in result["streamed"]
    ratios = result["ratios"]["streamed"]
    assert ratios["seeds"] == [0, 1]
    assert ratios["wall"] == [0.8, 0.9] and ratios["cpu"] == [0.8, 0.9] and ratios["peak_logit_bytes"] == [0.09, 0.11]
    assert ratios["first_step_over_precompute"] == [0.056, 0.15] and ratios["f1_diff"] == [0.5, 0.5]
    targets = result["targets"]["streamed"]
    assert targets["wall"]["met"] is False, "0.9 > 0.85 on seed 1: a target holds on every seed or not"
    assert targets["peak_logit_bytes"]["met"] is False
    assert targets["first_step_over_precompute"]["met"] is False
    # Each streamed pipeline is paired with the sequential run of its own seed only.
    cached = result["ratios"]["streamed_cache"]
    assert cached["seeds"] == [1] and cached["wall"] == [0.6] and cached["peak_logit_bytes"] == [0.9]
    assert cached["f1_diff"] == [-1.0]
    assert result["targets"]["streamed_cache"]["wall"]["met"] is True
    assert result["targets"]["streamed_cache"]["peak_logit_bytes"]["met"] is False
    del records["streamed", 0]["cpu_s"]  # a record made before CPU time was measured
    assert pipeline.aggregate(records)["ratios"]["streamed"]["cpu"] == [None, 0.9]
    records["streamed", 1] = record("streamed", 1, 820, 950, 15, None, 18.5)
    met = pipeline.aggregate(records)["targets"]["streamed"]
    assert all(met[name]["met"] for name in ("wall", "peak_logit_bytes", "first_step_over_precompute"))
    del records["sequential", 1]
    assert pipeline.aggregate(records)["targets"]["streamed_cache"]["wall"]["met"] is None, "no pair: not measured"


def test_the_table_goes_between_its_markers_and_a_rerun_replaces_it(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n## Other\n\nkept\n")
    out = tmp_path / "pipeline"
    args = pipeline.parse_args(["--out", str(out), "--results-md", str(results_md)])
    settings = {"description": "demo, 2 ranks"}
    for mode, seed in (("sequential", 0), ("streamed", 0)):
        path = runs.record_path(out, mode, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record(mode, seed, 1000 if mode == "sequential" else 700, 10_000 if
                                          mode == "sequential" else 500, 200 if mode == "sequential" else 5,
                                          180 if mode == "sequential" else None, 19.0)))
    records = runs.load_records(out, key="mode")
    pipeline.publish(args, records, settings)
    pipeline.publish(args, records, settings)  # once more: the section is replaced, not appended
    text = results_md.read_text()
    assert text.count("<!-- pipeline:pipeline begin -->") == 1 and "kept" in text
    assert "| 0 | sequential | 1000 |" in text and "| 0 | streamed | 700 |" in text
    assert "| wall to a trained student, streamed / sequential | streamed | 0 | 0.7 | 0.7 | ≤ 0.85 | met |" in text
    assert "Not compared yet (no seed with both runs): streamed_cache." in text and "| streamed_cache |" not in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["sequential"]["wall_s"] == [1000] and saved["streamed"]["peak_logit_bytes"] == [500]
    assert saved["settings"] == settings and saved["machine"]["cores"] == os.cpu_count()


def test_a_runs_cpu_time_counts_its_finished_child_processes():
    import subprocess

    before = pipeline.children_cpu_s()
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert pipeline.children_cpu_s() - before > 0.05


def test_a_rerun_refuses_records_made_with_other_settings(tmp_path):
    out = tmp_path / "pipeline"
    rec = {**record("streamed", 0, 700, 500, 5, None, 19.0),
           "overrides": [*pipeline.COMMON, *pipeline.MODES["streamed"], "seed=0"]}
    path = runs.record_path(out, "streamed", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    args = ["--out", str(out), "--work", str(tmp_path / "work"), "--results-md", str(tmp_path / "R.md"), "--table-only"]
    assert pipeline.main(args) == 0  # the same settings: the record counts
    with pytest.raises(SystemExit, match="streamed.seed0"):
        pipeline.main([*args, "--set", "data.demo_articles=480"])
