"""The run loop every trainer benchmark shares (benchmarks/quality.py, benchmarks/pipeline.py):
a queue of (name, seed) runs, each a real launch of the trainer with its own run directory,
launched one after another, its launcher's output in RUN/launcher.log; a finished run's
record goes to OUT/records/<name>.seed<s>.json (written atomically) and the tables are
rebuilt after every run, so a benchmark killed at any point resumes with what is done.
Also what those records are made of: the scores of a finished run (collect) and the code
that made it (code_version).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from dist_xqa.layout import STUDENT, RunLayout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
Key = tuple[str, int]  # (row or mode, seed)


def saved_models(layout: RunLayout) -> list[Path]:
    """The model folders of a run that hold a finished model (their DONE.json)."""
    return [d for d in [*layout.phase1_models(), layout.student] if layout.done(d).exists()]


def collect(run_dir: Path, test_sets: list[str]) -> dict | None:
    """The scores of a finished run, or None while they are incomplete: eval/summary.json
    must hold every model the run saved (a DONE.json under teachers/, models/ or
    student/) on every test set, and be newer than each of those models. An X-STA model
    scored with translate-test adds `<model>_p_T_alone` (the target side alone)."""
    layout = RunLayout(run_dir)
    summary_path = layout.eval_summary
    try:
        # files of the run (an X-STA oracle translation) recorded relative to it: no machine's paths
        summary = json.loads(summary_path.read_text().replace(f"{run_dir}/", ""))
    except (OSError, ValueError):
        return None
    done = [layout.done(d) for d in saved_models(layout)]
    if not done:
        return None
    models = {}
    for path in done:
        name = layout.model_name(path.parent)
        entry = summary.get(name)
        if entry is None or path.stat().st_mtime > summary_path.stat().st_mtime:
            return None
        if any(s not in entry.get("test_sets", {}) for s in test_sets):
            return None
        models[name] = entry
        # X-STA scored with translate-test keeps its p_T-alone scores beside: a model line of its own
        alone = {set_name: section["p_T_alone"] for set_name, section in entry["test_sets"].items()
                 if section.get("p_T_alone")}
        if alone:
            models[f"{name}_p_T_alone"] = {"selection": entry.get("selection"), "test_sets": alone}
    return {"models": dict(sorted(models.items()))}


def scalars_under(tb_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under `tb_dir` whose tag starts with `prefix`: tag ->
    [(step, value)] in step order (a resumed run writes an event file of its own)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith(prefix):
                found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in found.items()}


def scalar_values(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    return scalars_under(tb_dir, tag).get(tag, [])


def teacher_weights(run_dir: Path) -> dict[str, float] | None:
    """The LBMRC student's mean weight of each teacher over its logged steps
    (student/teacher_weight/<teacher>, logged by imp), or None without them."""
    prefix = "student/teacher_weight/"
    logged = scalars_under(RunLayout(run_dir).tb(STUDENT), prefix)
    return {tag.removeprefix(prefix): round(statistics.fmean(v for _, v in values), 4)
            for tag, values in sorted(logged.items())} or None


def teacher_forwards(run_dir: Path) -> dict[str, int] | None:
    """The teacher rows a run's producers computed and the shard files they wrote
    (rows_computed, shards_written in their heartbeats, dist_xqa.logits.writer), summed
    over the run's producers; None for a run without producers. Counts of the producers'
    last process: a run resumed after a kill counts its last start only."""
    from dist_xqa.logits.progress import PRODUCER_HEARTBEATS
    from dist_xqa.waiting import read_beat

    beats = [b for p in sorted(RunLayout(run_dir).stream.glob(PRODUCER_HEARTBEATS)) if (b := read_beat(p))]
    if not beats:
        return None
    return {key: sum(int(b.detail.get(key, 0)) for b in beats) for key in ("rows_computed", "shards_written")}


def code_version() -> str:
    """The trainer code a run used: git HEAD and a hash of the package's sources as they are
    on disk (uncommitted changes included), so that rows made by different code show."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    digest = hashlib.sha256()
    for path in sorted((ROOT / "dist_xqa").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{head.stdout.strip() or 'no-git'}+{digest.hexdigest()[:10]}"


def record_path(out: Path, name: str, seed: int) -> Path:
    """OUT/records/<name>.seed<s>.json: one finished run (a row, or a pipeline mode)."""
    return out / "records" / f"{name}.seed{seed}.json"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_records(out: Path, key: str = "row") -> dict[tuple[str, int], dict]:
    """OUT/records/*.json by (record[key], seed): a row here, a mode in benchmarks/pipeline.py."""
    records = {}
    for path in sorted((out / "records").glob("*.json")):
        rec = json.loads(path.read_text())
        records[rec[key], rec["seed"]] = rec
    return records


def write_section(results_md: Path, key: str, title: str, body: str, tool: str = "quality") -> None:
    """Replaces the text between this key's markers in RESULTS.md, or appends a section
    with them; the rest of the file is left as it is. `tool`: the benchmark whose
    sections the markers name."""
    begin, end = f"<!-- {tool}:{key} begin -->", f"<!-- {tool}:{key} end -->"
    text = results_md.read_text() if results_md.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    write_atomic(results_md, text)


def start_benchmark(args) -> Path:
    """A benchmark's start: SIGTERM ends it through run_trainer's clean-up (the launcher and
    its ranks stop with it); `args.out` resolved and made; returns the folder of its run
    directories, `args.work` or runs/<name of --out> (git-ignored), made."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    args.out = args.out.resolve()
    work = (args.work or ROOT / "runs" / args.out.name).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def free_port() -> int:
    """A port for this run's rendezvous (other users' runs may hold the launcher's default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(args, row_overrides: list[str], run_dir: Path) -> list[str]:
    """The users' launch of the trainer: `args.ranks` ranks, `args.deepspeed`, `args.config`."""
    venv_launcher = Path(sys.executable).with_name("deepspeed")  # this interpreter's, e.g. .venv/bin
    return [str(venv_launcher) if venv_launcher.exists() else "deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
            "dist_xqa/train.py", "--deepspeed", args.deepspeed, "--config", str(args.config),
            *row_overrides, f"run_dir={run_dir}"]


def run_trainer(cmd: list[str], env: dict, log) -> int:
    """Runs the launcher in a process group of its own; stopping this script (SIGTERM,
    Ctrl-C) stops the launcher and its ranks with it (the run is redone on the next start,
    resuming from its checkpoints)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise


class Progress:
    """Progress lines on stdout and in WORK/progress.log; the estimate of the rest uses each
    row's own time where a seed of it has finished, else the mean over finished runs."""

    def __init__(self, out: Path, records: dict):
        self.log = out / "progress.log"
        self.times = {key: rec["wall_s"] for key, rec in records.items()}

    def say(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def failed(self, what: str, seconds: float, why: str, run_dir: Path) -> None:
        """A run that did not finish: its reason and the end of its launcher.log."""
        tail = (run_dir / "launcher.log").read_text(errors="replace").splitlines()[-15:]
        self.say(f"FAILED {what} after {seconds:.0f} s ({why}):\n  " + "\n  ".join(tail))

    def finish(self, failed: list[tuple[str, int]]) -> int:
        """The exit status of a benchmark: 1 when a run failed (named here), else 0."""
        if failed:
            self.say(f"{len(failed)} run(s) failed: {', '.join(f'{name} seed {seed}' for name, seed in failed)}")
        return 1 if failed else 0

    def estimate(self, todo: list[tuple[str, int]]) -> str:
        if not self.times:
            return "no run finished yet"
        overall = statistics.fmean(self.times.values())
        by_row = {}
        for (row, _), t in self.times.items():
            by_row.setdefault(row, []).append(t)
        rest = sum(statistics.fmean(by_row[row]) if row in by_row else overall for row, _ in todo)
        return f"about {rest / 3600:.1f} h for the {len(todo)} left"


@dataclass
class Launch:
    """One queued run, as the benchmark sets it up: its run directory, the trainer command,
    a note for the start line, and `watch`, a context manager around the trainer's run
    (e.g. a sampler polling the run from outside)."""

    run_dir: Path
    cmd: list[str]
    note: str = ""
    watch: Callable[[], object] = field(default=nullcontext)


def run_queue(todo: list[Key], records: dict[Key, dict], out: Path, progress: Progress, env: dict,
              start: Callable[[Key], Launch], finish: Callable[[Key, Launch, int, float, object], dict | None],
              publish: Callable[[], None], done_line: Callable[[Key, dict], str]) -> int:
    """Runs `todo` in order: `start` sets a run up, the trainer runs (under its `watch`),
    `finish(key, launch, rc, wall_s, watched)` makes its record (None: the run failed, named
    with its launcher.log's tail), which is written and added to `records`; `publish`
    rebuilds the tables. Returns the benchmark's exit status (1 when a run failed)."""
    failed = []
    while todo:
        key = todo.pop(0)
        name, seed = key
        launch = start(key)
        progress.say(f"start {name} seed {seed}{launch.note}: {' '.join(launch.cmd)}")
        code = code_version()
        began = time.monotonic()
        with launch.watch() as watched, (launch.run_dir / "launcher.log").open("a") as log:
            rc = run_trainer(launch.cmd, env, log)
        wall = time.monotonic() - began
        rec = finish(key, launch, rc, wall, watched) if rc == 0 else None
        if rec is None:
            failed.append(key)
            progress.failed(f"{name} seed {seed}", wall, f"exit {rc}" + ("; no complete scores" if rc == 0 else ""),
                            launch.run_dir)
            continue
        rec["code"] = code
        write_atomic(record_path(out, name, seed), json.dumps(rec, ensure_ascii=False) + "\n")
        records[key] = rec
        progress.times[key] = rec.get("wall_s", wall)
        publish()
        progress.say(f"{done_line(key, rec)}; {len(todo)} to do ({progress.estimate(todo)})")
    publish()
    return progress.finish(failed)
