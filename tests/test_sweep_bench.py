"""benchmarks/sweep.py's bookkeeping: the run order, and the totals read from records
(each run's wall time and the teacher rows its producers counted)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweep_bench", ROOT / "benchmarks" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sweep
_spec.loader.exec_module(sweep)


def record(name: str, wall: float, rows: int, f1: float) -> dict:
    section = {"xlt": {"f1": f1}, "g_xlt": {"f1": f1 + 1}}
    return {"row": name, "seed": 0, "wall_s": wall, "teacher_forwards": {"rows_computed": rows, "shards_written": rows // 10},
            "models": {"student": {"test_sets": {"test": section}}}}


def test_each_students_separate_and_sweep_runs_follow_the_first_back_to_back():
    assert [name for name, _, _ in sweep.runs()] == [
        "first", "separate_kd0.5", "sweep_kd0.5", "separate_kd0.7", "sweep_kd0.7", "separate_hyper", "sweep_hyper"]


def test_totals_count_the_first_run_in_both_and_only_once_every_run_is_done():
    walls = {"first": 100, "separate_kd0.5": 50, "sweep_kd0.5": 20, "separate_kd0.7": 60, "sweep_kd0.7": 30,
             "separate_hyper": 70, "sweep_hyper": 10}
    rows = {"first": 300, "separate_kd0.5": 300, "separate_kd0.7": 300, "separate_hyper": 300}
    records = {(n, 0): record(n, w, rows.get(n, 0), 10.0) for n, w in walls.items()}
    partial = sweep.summarise({k: v for k, v in records.items() if k[0] != "sweep_hyper"}, 0)
    assert partial["totals"] == {} and len(partial["rows"]) == 6
    summary = sweep.summarise(records, 0)
    assert summary["totals"]["separate"] == {"wall_s": 280, "teacher_rows_computed": 1200, "shards_written": 120}
    assert summary["totals"]["sweep"] == {"wall_s": 160, "teacher_rows_computed": 300, "shards_written": 30}
    assert summary["totals"]["wall_ratio_sweep_over_separate"] == round(160 / 280, 3)
    assert "wall ratio 0.57" in sweep.markdown(summary, "budget")
