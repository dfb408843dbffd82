"""The paper's sequential pipeline against this project's concurrent, streamed one, end to
end: real trainer launches on the same ranks, model, data and seeds, only the pipeline's
options differing (MODES).

    python benchmarks/pipeline.py --config configs/demo.yaml --seeds 0,1,2 --out benchmarks/results/pipeline

- sequential (the paper's): `plan.teacher_schedule=sequential` (each teacher trained alone
  on every rank, one after another; in phase 2 every rank produces part of every teacher's
  logits), `distill.precompute=true` with `distill.store_mode=cache` (all K x |D| logits
  written to disk before the student's first step, read from there in every epoch);
- streamed (this project's): teachers concurrent in role groups
  (`plan.teacher_schedule=balanced`), logits written a bounded look-ahead ahead of the
  student (`distill.store_mode=window`, produced again each epoch): the least disk;
- streamed_cache: the same, but each shard is kept for the later epochs once written
  (`distill.store_mode=cache`, the demo's setting): one teacher forward per row, as the
  precompute, and the disk of the whole of D by the end of the first epoch.

Each streamed pipeline is compared with the sequential one (BASELINE) seed by seed.

Both get `teacher.global_batch_size` fixed (COMMON), so that a teacher's optimizer steps
are the same whether its group has one rank or all of them: the two pipelines then train
the same models and differ in when and where the work runs.

Every rank runs OMP_NUM_THREADS = cores / ranks intra-op threads (unless the environment
sets it): with torch's default, each rank as many threads as the machine has cores, a
one-rank teacher group of the balanced plan trained 5-7x slower per sample than a two-rank
group on a loaded 2-core machine, which would have measured the threads, not the pipelines.

Runs go seed by seed, the modes interleaved (sequential seed 0, streamed seed 0,
streamed_cache seed 0, sequential seed 1, ...), so that the load of the shared machine
falls on all alike; the ratios are taken per seed. `--modes` runs some of them. Each run is
launched as quality.py launches its rows (trainer_command, run_trainer) into
WORK/seed<s>/<mode>; a finished run leaves
OUT/records/<mode>.seed<s>.json and is skipped by a rerun; an unfinished one is started
afresh (a resumed run's times would mean nothing).

Measured per run (measure(), from the run's own files, and Sampler, from outside):
- wall_s: launch to the student's DONE.json (a trained student; evaluation excluded),
  total_s: to the trainer's exit;
- first_student_step_s: the last teacher's DONE.json to the student's first optimizer step,
  the wall time of the first TensorBoard scalar of tb/student (the student writes its
  scalars of step 0 right after that step); precompute_s (sequential): the last teacher's
  DONE.json to the newest shard file (the precompute writes every shard, nothing later);
- peak_logit_bytes: the largest size of WORK/.../logits, polled every POLL_S seconds while
  the run runs; samples_per_s: the student's `samples_per_second` scalars (step 0 left out:
  it counts the start-up); f1 and teachers_f1: XLT F1 on the test set (eval/summary.json);
- load_1min: the machine's 1-minute load average during the run (mean and max); cpu_s: the
  CPU time of the launcher and its ranks (a loaded machine stretches it far less than wall).

OUT.json (e.g. benchmarks/results/pipeline.json) gathers them as lists over seeds per
mode, the per-seed ratios and the targets; the table goes to OUT/table.md and to this
benchmark's section of benchmarks/RESULTS.md. Progress: stdout and WORK/progress.log.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.runs import (RESULTS_MD, ROOT, Launch, Progress, collect, load_records, run_queue, scalar_values,  # noqa: E402
                             start_benchmark, trainer_command, write_atomic, write_section)
from dist_xqa.config import load_config  # noqa: E402
from dist_xqa.disk import directory_bytes  # noqa: E402
from dist_xqa.layout import STUDENT, RunLayout  # noqa: E402

MODES = {
    "sequential": ("plan.teacher_schedule=sequential", "distill.precompute=true", "distill.store_mode=cache"),
    "streamed": ("plan.teacher_schedule=balanced", "distill.store_mode=window"),
    "streamed_cache": ("plan.teacher_schedule=balanced", "distill.store_mode=cache"),
}
BASELINE = "sequential"
STREAMED = tuple(mode for mode in MODES if mode != BASELINE)
COMMON = ("teacher.global_batch_size=16",)  # the demo's one-rank teacher batch, whatever the group
POLL_S = 0.2
REPORT_EVERY_S = 60.0
LOAD_EVERY_S = 5.0
# The targets, streamed against sequential.
TARGETS = {"wall_ratio_max": 0.85, "peak_logit_ratio_max": 0.10, "first_step_over_precompute_max": 0.10}


# --------------------------------------------------------------------------- measuring a run


class Sampler(threading.Thread):
    """Polls a running run from outside: the peak bytes of its logit store and the load
    average; every REPORT_EVERY_S a progress line (teachers done, student step)."""

    def __init__(self, run_dir: Path, say, label: str):
        super().__init__(daemon=True, name=f"sampler {label}")
        self.run_dir, self.say, self.label = run_dir, say, label
        self.peak_logit_bytes = 0
        self.loads: list[float] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        began = last_load = last_report = time.monotonic()
        self.loads.append(os.getloadavg()[0])
        while not self._stop_event.wait(POLL_S):
            self.peak_logit_bytes = max(self.peak_logit_bytes, directory_bytes(RunLayout(self.run_dir).store))
            now = time.monotonic()
            if now - last_load >= LOAD_EVERY_S:
                last_load = now
                self.loads.append(os.getloadavg()[0])
            if now - last_report >= REPORT_EVERY_S:
                last_report = now
                self.say(f"  {self.label}: {(now - began) / 60:.1f} min, {describe_state(self.run_dir)}, logit store "
                         f"peak {self.peak_logit_bytes / 2**20:.1f} MiB, load {self.loads[-1]:.1f}")

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Watch:
    """Around one trainer run: its wall-clock start and end, its CPU time and a Sampler."""

    def __init__(self, run_dir: Path, say, label: str):
        self.sampler = Sampler(run_dir, say, label)

    def __enter__(self) -> Watch:
        self.cpu_before, self.started = children_cpu_s(), time.time()
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.stop()
        self.ended, self.cpu_s = time.time(), children_cpu_s() - self.cpu_before


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children and their waited-for
    descendants (the launcher and its ranks): a run's CPU time, which a loaded machine
    stretches far less than its wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def describe_state(run_dir: Path) -> str:
    layout = RunLayout(run_dir)
    teachers = sum(layout.done(d).exists() for d in layout.phase1_models())
    beat = layout.heartbeat(STUDENT, 0)
    try:
        student = json.loads(beat.read_text())
        where = f"student step {student.get('step')} ({student.get('state')})"
    except (OSError, ValueError):
        where = "student not started"
    return f"{teachers} teacher(s) done, {where}"


def first_scalar_time(tb_dir: Path) -> float | None:
    """The wall time of the earliest scalar in the event files under `tb_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = []
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        times += [e.wall_time for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
    return min(times, default=None)


def measure(run_dir: Path, started: float, ended: float, peak_logit_bytes: int, loads: list[float],
            precomputed: bool) -> dict | None:
    """A finished run's figures (see the module docstring), or None when the run has no
    scored student. `started`, `ended`: wall-clock times (time.time()) of launch and exit;
    `precomputed`: the run precomputed its store (precompute_s means something)."""
    layout = RunLayout(run_dir)
    scores = collect(run_dir, ["test"])
    teacher_done = [layout.done(d).stat().st_mtime for d in layout.phase1_models() if layout.done(d).exists()]
    student_done = layout.done(layout.student)
    first_step = first_scalar_time(layout.tb(STUDENT))
    if scores is None or STUDENT not in scores["models"] or not teacher_done or first_step is None:
        return None
    teachers_done = max(teacher_done)
    shards = [p.stat().st_mtime for p in layout.store.glob("*/shard_*")]
    speeds = [v for step, v in scalar_values(layout.tb(STUDENT), "samples_per_second") if step > 0]
    xlt = {name: model["test_sets"]["test"]["xlt"]["f1"] for name, model in scores["models"].items()}
    return {
        "wall_s": round(student_done.stat().st_mtime - started, 1),
        "total_s": round(ended - started, 1),
        "teachers_s": round(teachers_done - started, 1),
        "first_student_step_s": round(first_step - teachers_done, 2),
        "precompute_s": round(max(shards) - teachers_done, 2) if shards and precomputed else None,
        "peak_logit_bytes": peak_logit_bytes,
        "samples_per_s": round(statistics.fmean(speeds), 2) if speeds else None,
        "f1": round(xlt[STUDENT], 2),
        "teachers_f1": {name.removeprefix("teacher_"): round(v, 2) for name, v in sorted(xlt.items())
                        if name.startswith("teacher_")},
        "load_1min": {"mean": round(statistics.fmean(loads), 2), "max": round(max(loads), 2)} if loads else None,
    }


# --------------------------------------------------------------------------- aggregating


def precomputed(mode: str) -> bool:
    return "distill.precompute=true" in MODES[mode]


FIGURES = ("wall_s", "total_s", "cpu_s", "teachers_s", "first_student_step_s", "precompute_s", "peak_logit_bytes",
           "samples_per_s", "f1")


def aggregate(records: dict[tuple[str, int], dict]) -> dict:
    """pipeline.json's figures: per mode, each figure as a list over its finished seeds (in
    seed order, `seeds` says which); per streamed mode, on each seed it shares with the
    sequential baseline, the ratios the targets are about (`ratios[mode]`), and whether each
    target is met on every such seed (`targets[mode]`)."""
    result: dict = {}
    for mode in MODES:
        runs = sorted((seed, rec) for (m, seed), rec in records.items() if m == mode)
        figures = [k for k in FIGURES if k != "precompute_s" or precomputed(mode)]
        result[mode] = {"seeds": [seed for seed, _ in runs], **{k: [rec.get(k) for _, rec in runs] for k in figures},
                        "teachers_f1": [rec["teachers_f1"] for _, rec in runs],
                        "load_1min": [rec["load_1min"] for _, rec in runs]}
    result["ratios"], result["targets"] = {}, {}
    for mode in STREAMED:
        paired = sorted(seed for (m, seed) in records if m == BASELINE and (mode, seed) in records)
        ratios = {"seeds": paired, "wall": [], "cpu": [], "peak_logit_bytes": [], "first_step_over_precompute": [],
                  "f1_diff": []}
        for seed in paired:
            seq, stream = records[BASELINE, seed], records[mode, seed]
            ratios["wall"].append(round(stream["wall_s"] / seq["wall_s"], 3))
            ratios["cpu"].append(round(stream["cpu_s"] / seq["cpu_s"], 3) if seq.get("cpu_s") and stream.get("cpu_s")
                                 else None)  # records made before CPU time was measured have none
            ratios["peak_logit_bytes"].append(round(stream["peak_logit_bytes"] / seq["peak_logit_bytes"], 4)
                                              if seq["peak_logit_bytes"] else None)
            ratios["first_step_over_precompute"].append(
                round(stream["first_student_step_s"] / seq["precompute_s"], 3) if seq["precompute_s"] else None)
            ratios["f1_diff"].append(round(stream["f1"] - seq["f1"], 2))
        result["ratios"][mode] = ratios
        result["targets"][mode] = {
            name: {"max": limit, "met": all(v is not None and v <= limit for v in ratios[name]) if paired else None}
            for name, limit in (("wall", TARGETS["wall_ratio_max"]), ("peak_logit_bytes", TARGETS["peak_logit_ratio_max"]),
                                ("first_step_over_precompute", TARGETS["first_step_over_precompute_max"]))}
    return result


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"


def markdown(result: dict) -> str:
    """The table of RESULTS.md: per seed and mode the figures, then the per-seed ratios and
    the targets."""
    head = ["seed", "pipeline", "wall to student (s)", "total (s)", "CPU (s)", "teachers (s)", "first student step (s)",
            "precompute (s)", "peak logits (MiB)", "student samples/s", "student XLT F1", "load (mean/max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seeds = sorted({seed for mode in MODES for seed in result[mode]["seeds"]})
    for seed in seeds:
        for mode in MODES:
            m = result[mode]
            if seed not in m["seeds"]:
                continue
            i = m["seeds"].index(seed)
            load = m["load_1min"][i]
            cells = [str(seed), mode, f"{m['wall_s'][i]:.0f}", f"{m['total_s'][i]:.0f}",
                     "-" if m["cpu_s"][i] is None else f"{m['cpu_s'][i]:.0f}", f"{m['teachers_s'][i]:.0f}",
                     f"{m['first_student_step_s'][i]:.1f}",
                     "-" if m.get("precompute_s", [None] * len(m["seeds"]))[i] is None
                     else f"{m['precompute_s'][i]:.1f}",
                     f"{m['peak_logit_bytes'][i] / 2**20:.2f}",
                     "-" if m["samples_per_s"][i] is None else f"{m['samples_per_s'][i]:.1f}",
                     f"{m['f1'][i]:.1f}", "-" if load is None else f"{load['mean']:.1f}/{load['max']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    compared = [mode for mode in STREAMED if result["ratios"][mode]["seeds"]]
    if missing := [mode for mode in STREAMED if mode not in compared]:
        lines += ["", f"Not compared yet (no seed with both runs): {', '.join(missing)}."]
    lines += ["", "Each streamed pipeline against the sequential one, per seed:", "",
              "| figure | pipeline | seeds | per seed | mean ± std | target | |", "|---|---|---|---|---|---|---|"]
    notes = {"cpu": "(wall's check on a loaded machine)", "f1_diff": "within seed noise"}
    for name, figure in (("wall", "wall to a trained student, streamed / sequential"),
                         ("cpu", "CPU time of the whole run (launcher and ranks), streamed / sequential"),
                         ("peak_logit_bytes", "peak logit bytes, streamed / sequential"),
                         ("first_step_over_precompute", "streamed first student step / sequential precompute time"),
                         ("f1_diff", "student XLT F1, streamed - sequential")):
        for mode in compared:
            r, t = result["ratios"][mode], result["targets"][mode].get(name)
            goal, met = (f"≤ {t['max']}", verdict[t["met"]]) if t else (notes[name], "")
            lines.append(f"| {figure} | {mode} | {', '.join(map(str, r['seeds']))} | {_list(r[name])} | "
                         f"{_mean_std(r[name])} | {goal} | {met} |")
    return "\n".join(lines)


def _list(values: list) -> str:
    return ", ".join("-" if v is None else f"{v:g}" for v in values) or "-"


def machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def publish(args, records: dict, settings: dict) -> None:
    result = aggregate(records)
    result.update({"machine": machine(), "settings": settings})
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    body = (f"{settings['description']}\n\n{markdown(result)}\n\n"
            "The machine is shared with other jobs: compare the two pipelines seed by seed (their runs are launched "
            "back to back), not by absolute times, and read the load and CPU columns beside each ratio: the load "
            "can still change a lot between the two runs of a seed, CPU time much less.\n")
    write_atomic(args.out / "table.md", body)
    write_section(args.results_md, args.out.name, f"Pipeline `{args.out.name}`: sequential (precomputed) vs "
                  "streamed (generated by benchmarks/pipeline.py)", body, tool="pipeline")


# --------------------------------------------------------------------------- running


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated pipelines to run ({', '.join(MODES)})")
    p.add_argument("--out", type=Path, required=True,
                   help="OUT.json (the figures), OUT/records/, OUT/table.md; OUT's name keys the RESULTS.md section")
    p.add_argument("--work", type=Path, help="run directories (default runs/<name of --out>, git-ignored)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (--num_gpus): GPUs where CUDA is available, else CPU processes (DS_ACCELERATOR=cpu)")
    p.add_argument("--deepspeed", default="ds_configs/zero2.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both pipelines (a larger scale: --set data.demo_articles=240)")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="where the table's section goes")
    p.add_argument("--table-only", action="store_true", help="rebuild the JSON and the tables from the records")
    return p.parse_args(argv)


def gpu_name() -> str | None:
    """The GPU the ranks run on (one per rank), or None: CPU ranks under DS_ACCELERATOR=cpu."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def describe(args, overrides: list[str], gpu: str | None) -> str:
    cfg = load_config(args.config, overrides)
    t, s = cfg.teacher, cfg.student
    ranks = "CPU ranks" if gpu is None else f"GPU ranks ({gpu})"
    return (f"`{args.config.name}` {' '.join(overrides)}, {args.ranks} {ranks}, model `{cfg.model.name}` "
            f"(L = {cfg.model.max_length}); teachers {', '.join(cfg.teacher_languages)}: {t.epochs} epochs; student "
            f"{s.epochs} epochs. Pipeline options: "
            + "; ".join(f"{mode}: {' '.join(opts)}" for mode, opts in MODES.items()) + ".")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = start_benchmark(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"pipeline: unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    common = list(COMMON) + args.overrides
    for mode in modes:  # every config is checked before anything runs
        load_config(args.config, common + list(MODES[mode]))
    # One intra-op thread per core of a rank: more threads than cores make every torch op of a
    # rank wait for a descheduled sibling thread (a one-rank teacher group ran 5-7x slower per
    # sample with torch's default of one thread per core in each rank; RESULTS.md).
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.ranks))
    gpu = gpu_name()
    settings = {"config": str(args.config), "ranks": args.ranks, "deepspeed": args.deepspeed, "common": common,
                "omp_num_threads": threads, "gpu": gpu,
                "modes": {mode: list(opts) for mode, opts in MODES.items()}, "seeds": seeds,
                "description": f"{describe(args, common, gpu)} Each rank runs OMP_NUM_THREADS={threads} intra-op thread(s)."}
    records = load_records(args.out, key="mode")
    # A record made with other settings (--set, or MODES changed since) is no run of these:
    # never paired with them, so OUT must be another folder.
    if stale := sorted(f"{m}.seed{s}" for (m, s), rec in records.items()
                       if rec["overrides"] != common + list(MODES.get(m, ("unknown mode",))) + [f"seed={s}"]):
        raise SystemExit(f"pipeline: {args.out / 'records'} holds runs made with other settings "
                         f"({', '.join(stale)}); use another --out for these settings")
    progress = Progress(work, records)
    todo = [(mode, seed) for seed in seeds for mode in MODES if mode in modes and (mode, seed) not in records]
    progress.say(f"{settings['description']}\n{len(records)} run(s) done, {len(todo)} to do "
                 f"({progress.estimate(todo)}); runs under {work}")
    if args.table_only:
        publish(args, records, settings)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": settings["omp_num_threads"], **({} if gpu else {"DS_ACCELERATOR": "cpu"})}
    def start(key: tuple[str, int]) -> Launch:
        mode, seed = key
        run_dir = work / f"seed{seed}" / mode
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run's times mean nothing: afresh
        run_dir.mkdir(parents=True)
        cmd = trainer_command(args, common + list(MODES[mode]) + [f"seed={seed}"], run_dir)
        return Launch(run_dir, cmd, watch=lambda: Watch(run_dir, progress.say, f"{mode} seed {seed}"))

    def finish(key: tuple[str, int], launch: Launch, rc: int, wall: float, watch: Watch) -> dict | None:
        mode, seed = key
        figures = measure(launch.run_dir, watch.started, watch.ended, watch.sampler.peak_logit_bytes,
                          watch.sampler.loads, precomputed(mode))
        if figures is None:
            return None
        run_dir = launch.run_dir
        return {"mode": mode, "seed": seed, "overrides": common + list(MODES[mode]) + [f"seed={seed}"], "run_dir":
                str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir), **figures,
                "cpu_s": round(watch.cpu_s, 1)}

    def done_line(key: tuple[str, int], rec: dict) -> str:
        return (f"done {key[0]} seed {key[1]}: student trained in {rec['wall_s']:.0f} s, first student step "
                f"{rec['first_student_step_s']:.1f} s after the last teacher, peak logits "
                f"{rec['peak_logit_bytes'] / 2**20:.2f} MiB, F1 {rec['f1']:.1f}")

    return run_queue(todo, records, args.out, progress, env, start, finish,
                     lambda: publish(args, records, settings), done_line)


if __name__ == "__main__":
    sys.exit(main())
