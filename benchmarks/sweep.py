"""A sweep of students over one teacher pass, against separate runs that each redo the
teachers' inference: wall time and teacher forwards (counted by the producers).

    python benchmarks/sweep.py --config configs/demo.yaml --seed 0 --out benchmarks/results/sweep_demo
    python benchmarks/sweep.py --config configs/xquad.yaml --scale cpu --seed 0 --out benchmarks/results/sweep_xquad

Four students differ only in the distillation keys a researcher sweeps (STUDENTS: lambda_kd
0.3, 0.5, 0.7, and hyper's 1/K weights). The first run (`first`, lambda_kd 0.3) trains the
teachers and fills its logit store. Each other student then runs twice on those teachers
(`phase1_from`, nothing retrained), in turn:

- `separate_<student>`: its own store, as a run without a shared store does: its producers
  compute every teacher row over D again;
- `sweep_<student>`: `distill.store_dir` = the first run's store: every row is read.

Both totals count the first run once (the same run in both), so the ratio is
(first + the sweep's three) / (first + the separate three); running each pair back to back
keeps the machine's drift out of it. A separate and a sweep run of the same student, seed and
store read the same logits, so their students are the same: the table shows their F1 side
by side. Each run is one launch of the trainer (benchmarks/runs.py: resumable, records under
OUT/records/, the table in OUT/table.md and RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.quality import PROFILES, resolve  # noqa: E402
from benchmarks.runs import (RESULTS_MD, ROOT, Launch, Progress, collect, load_records, run_queue,  # noqa: E402
                             start_benchmark, teacher_forwards, trainer_command, write_atomic, write_section)
from dist_xqa.config import load_config  # noqa: E402
from dist_xqa.layout import RunLayout  # noqa: E402

# The students of the sweep: name -> the distillation keys that make it.
STUDENTS = {"kd0.3": ("distill.lambda_kd=0.3",), "kd0.5": ("distill.lambda_kd=0.5",),
            "kd0.7": ("distill.lambda_kd=0.7",), "hyper": ("distill.aggregation=hyper",)}
FIRST = "first"  # the run that trains the teachers and fills the store: the first student


def runs() -> list[tuple[str, str, str]]:
    """(run name, student, mode) in run order: the first, then each other student's
    separate and sweep runs back to back."""
    first, *others = STUDENTS
    order = [(FIRST, first, "first")]
    for student in others:
        order += [(f"separate_{student}", student, "separate"), (f"sweep_{student}", student, "sweep")]
    return order


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="records/, sweep.json, table.md")
    p.add_argument("--work", type=Path, help="run directories (default runs/<name of --out>, git-ignored)")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu", help="as benchmarks/quality.py's")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--deepspeed", default="ds_configs/zero2.json")
    p.add_argument("--table-only", action="store_true", help="rebuild sweep.json and the table from records")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, after the profile's (a smaller run: --set teacher.epochs=1)")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="where the table's section goes")
    return p.parse_args(argv)


def student_f1(rec: dict) -> tuple[float, float]:
    """The student's XLT and G-XLT F1 on the run's first test set."""
    section = next(iter(rec["models"]["student"]["test_sets"].values()))
    return section["xlt"]["f1"], section["g_xlt"]["f1"]


def summarise(records: dict[tuple[str, int], dict], seed: int) -> dict:
    """Per student: each mode's wall time, teacher forwards and student F1; the totals and
    the sweep's wall ratio, once every run is done."""
    by_name = {name: rec for (name, s), rec in records.items() if s == seed}
    rows = []
    for name, student, mode in runs():
        if (rec := by_name.get(name)) is not None:
            xlt, gxlt = student_f1(rec)
            rows.append({"run": name, "student": student, "mode": mode, "wall_s": rec["wall_s"],
                         **rec["teacher_forwards"],
                         "student_xlt_f1": round(xlt, 2), "student_gxlt_f1": round(gxlt, 2)})
    totals = {}
    if len(rows) == len(runs()):
        for mode in ("separate", "sweep"):
            picked = [r for r in rows if r["mode"] in (FIRST, mode)]
            totals[mode] = {"wall_s": round(sum(r["wall_s"] for r in picked), 1),
                            "teacher_rows_computed": sum(r["rows_computed"] for r in picked),
                            "shards_written": sum(r["shards_written"] for r in picked)}
        totals["wall_ratio_sweep_over_separate"] = round(totals["sweep"]["wall_s"] / totals["separate"]["wall_s"], 3)
    return {"seed": seed, "rows": rows, "totals": totals}


def markdown(summary: dict, budget: str) -> str:
    lines = [budget, "", "| run | student | wall s | teacher rows computed | shard files written | student XLT F1 | G-XLT F1 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['run']} | {r['student']} | {r['wall_s']:.0f} | {r['rows_computed']:,} | "
                     f"{r['shards_written']:,} | {r['student_xlt_f1']:.1f} | {r['student_gxlt_f1']:.1f} |")
    if t := summary["totals"]:
        lines += ["", f"Four students, seed {summary['seed']}: separately {t['separate']['wall_s']:.0f} s and "
                  f"{t['separate']['teacher_rows_computed']:,} teacher rows; as a sweep over one teacher pass "
                  f"{t['sweep']['wall_s']:.0f} s and {t['sweep']['teacher_rows_computed']:,} teacher rows "
                  f"(wall ratio {t['wall_ratio_sweep_over_separate']:.2f}; the first run counted in both)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = start_benchmark(args)
    profile = PROFILES.get((args.config.stem, args.scale), []) + args.overrides
    for overrides in STUDENTS.values():  # every student's config is checked before anything runs
        load_config(args.config, resolve(profile + list(overrides)))
    records = {key: rec for key, rec in load_records(args.out).items() if key[1] == args.seed}
    progress = Progress(work, records)
    cfg = load_config(args.config, resolve(profile))
    budget = (f"`{args.config.name}`, {args.scale} profile, {args.ranks} ranks, seed {args.seed}: teachers "
              f"{cfg.teacher.epochs} epochs, students {cfg.student.epochs} epochs; store {cfg.distill.logits_dtype}, "
              f"{'top-' + str(cfg.distill.store_topk) if cfg.distill.store_topk else 'dense'}"
              + (f"; --set {' '.join(args.overrides)}." if args.overrides else "."))
    first_dir = work / f"seed{args.seed}" / FIRST

    def publish() -> None:
        summary = summarise(records, args.seed)
        write_atomic(args.out / "sweep.json", json.dumps({**summary, "config": str(args.config), "scale": args.scale,
                                                          "ranks": args.ranks}, indent=1) + "\n")
        body = markdown(summary, budget)
        write_atomic(args.out / "table.md", body + "\n")
        write_section(args.results_md, f"{args.config.stem}-{args.scale}",
                      f"Sweep over one teacher pass: `{args.config.name}`, {args.scale} profile "
                      "(generated by benchmarks/sweep.py)", body, tool="sweep")

    todo = [(name, args.seed) for name, _, _ in runs() if (name, args.seed) not in records]
    progress.say(f"{len(runs()) - len(todo)} of {len(runs())} runs done; runs under {work}")
    if args.table_only or not todo:
        publish()
        return 0
    env = {**os.environ, "DS_ACCELERATOR": "cpu"} if args.scale == "cpu" else dict(os.environ)
    modes = {name: (student, mode) for name, student, mode in runs()}

    def start(key: tuple[str, int]) -> Launch:
        name, seed = key
        student, mode = modes[name]
        run_dir = work / f"seed{seed}" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        extra = [] if mode == "first" else [f"phase1_from={first_dir}"]
        if mode == "sweep":
            extra.append(f"distill.store_dir={RunLayout(first_dir).store}")
        overrides = resolve(profile + list(STUDENTS[student])) + [f"seed={seed}"] + extra
        return Launch(run_dir, trainer_command(args, overrides, run_dir), f" ({mode})")

    def finish(key: tuple[str, int], launch: Launch, rc: int, wall: float, _) -> dict | None:
        name, seed = key
        scores = collect(launch.run_dir, [t.name for t in cfg.data.test] or ["test"])
        if scores is None:
            return None
        forwards = teacher_forwards(launch.run_dir) or {"rows_computed": 0, "shards_written": 0}
        return {"row": name, "seed": seed, "mode": modes[name][1], "student": modes[name][0], "wall_s": round(wall, 1),
                "teacher_forwards": forwards, **scores}

    def done_line(key: tuple[str, int], rec: dict) -> str:
        return (f"done {key[0]} in {rec['wall_s']:.0f} s, {rec['teacher_forwards']['rows_computed']:,} teacher rows "
                "computed")

    return run_queue(todo, records, args.out, progress, env, start, finish, publish, done_line)


if __name__ == "__main__":
    sys.exit(main())
