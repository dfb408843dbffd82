"""The main job end to end, as users run it: the deepspeed launcher with 2 CPU ranks runs
the embedded demo (branch teachers, streamed distillation, evaluation) into a temporary
run directory; then the outputs are checked: the student beats the mean of its teachers
and an untrained model by far, every model loads in Hugging Face, TensorBoard holds the
per-branch tags, and rerunning the command redoes no finished stage."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("en", "es", "de")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BIN = Path(sys.executable).parent  # the venv's launchers and ninja come first on PATH


def cpu_env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{BIN}:{os.environ['PATH']}",
            "MASTER_PORT": str(free_port())}


def train_command(run_dir: Path, *overrides: str, ranks: int = 2,
                  env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The README's main-job command on `ranks` CPU ranks, into `run_dir`; `env`: variables
    to add to the job's environment."""
    env = {**cpu_env(), **(env or {})}
    command = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", env["MASTER_PORT"],
               "dist_xqa/train.py", "--deepspeed", "ds_configs/zero2.json", f"run_dir={run_dir}", *overrides]
    return command, env


def launch(run_dir: Path, *overrides: str, ranks: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command, env = train_command(run_dir, *overrides, ranks=ranks, env=env)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def tensorboard_tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in tb_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def untrained_f1(run_dir: Path) -> float:
    """Pooled test F1 of the student's architecture before any training."""
    from dist_xqa.config import load_config
    from dist_xqa.eval.decode import postprocess
    from dist_xqa.eval.report import score
    from dist_xqa.inference import predict_logits
    from dist_xqa.models import build_model
    from dist_xqa.prepared import SPLIT_TEST_SET, Prepared

    cfg = load_config(None, [f"run_dir={run_dir}"])
    prepared = Prepared(run_dir)
    test = prepared.test_set(SPLIT_TEST_SET)
    features = test.features()
    model = build_model(cfg.model, prepared.tokenizer(), seed=cfg.seed + 1)
    start, end = predict_logits(model, features, 64, torch.device("cpu"))
    preds = postprocess(features, start, end, test.examples(), cfg.eval.n_best, cfg.eval.max_answer_length)
    return score(test.gold(), preds, cfg.data.normalization)["pooled"]["f1"]


def split_test_reports(run_dir: Path) -> dict[str, dict]:
    """Each model's report on the demo's one test set (the corpus's test split)."""
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    return {name: model["test_sets"]["test"] for name, model in summary.items()}


def run_dir_listing(run_dir: Path) -> list[str]:
    """Every file and folder of a run directory, digits as N (steps, ranks, shard numbers),
    less the demo corpus, the feature cache and TensorBoard's event files (named by host and
    time): the run directory's layout, whatever the run's sizes."""
    found = set()
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir).as_posix()
        if rel.startswith(("prepared/cache", "data/")) or "tfevents" in rel:
            continue
        found.add(re.sub(r"\d+", "N", rel) + ("/" if path.is_dir() else ""))
    return sorted(found)


@pytest.mark.slow
def test_demo_end_to_end_on_two_cpu_ranks(tmp_path):
    run_dir = tmp_path / "demo"
    first = launch(run_dir)

    summary = split_test_reports(run_dir)
    assert set(summary) == {"student", *(f"teacher_{lang}" for lang in LANGUAGES)}
    f1 = {name: report["pooled"]["f1"] for name, report in summary.items()}
    teachers_mean = sum(f1[f"teacher_{lang}"] for lang in LANGUAGES) / len(LANGUAGES)
    baseline = untrained_f1(run_dir)
    assert f1["student"] >= teachers_mean, f1
    assert f1["student"] >= baseline + 10 and f1["student"] >= 3 * baseline, (f1, baseline)
    student = summary["student"]
    assert set(student["per_language"]) == set(LANGUAGES)
    assert {"xlt", "g_xlt", "matrix"} <= set(student)
    assert "student" in first.stdout and "G-XLT" in first.stdout, "the EM/F1 table is printed"

    # Every model is a Hugging Face model with its tokenizer.
    from transformers import AutoModelForQuestionAnswering, pipeline

    for model_dir in [run_dir / "student", *(run_dir / "teachers" / lang for lang in LANGUAGES)]:
        AutoModelForQuestionAnswering.from_pretrained(model_dir)
    qa = pipeline("question-answering", model=str(run_dir / "student"), tokenizer=str(run_dir / "student"))
    answer = qa(question="Who worked as a carpenter?",
                context="Anna Kramer worked as a carpenter. David Weber worked as an engineer.")
    assert answer["answer"].strip() and answer["start"] < answer["end"]

    tags = tensorboard_tags(run_dir / "tb")
    expected = {"student/nll", "student/kd", "student/lr", "samples_per_second", "stream/lookahead_shards",
                "stream/wait_seconds", "stream/bytes_on_disk"}
    for lang in LANGUAGES:
        expected |= {f"teacher/{lang}/loss", f"teacher/{lang}/lr", f"student/kd_by_branch/{lang}",
                     f"student/teacher_weight/{lang}", f"eval/student/test/{lang}/f1", f"eval/teacher_{lang}/test/{lang}/em"}
    assert expected <= tags, sorted(expected - tags)
    assert (run_dir / "config.yaml").exists() and (run_dir / "logs" / "rank0.log").exists()

    # Every file of a run directory made by the code before the layout module is where
    # today's code puts it (the listing: `run_dir_listing` of a run of that code), so such a
    # directory opens as one of today's; files added since (the preparation's heartbeat,
    # the store's claim locks) are new, none moved.
    listing = (Path(__file__).parent / "fixtures" / "run_dir_listing_lbmrc.txt").read_text().split()
    assert not set(listing) - set(run_dir_listing(run_dir)), sorted(set(listing) - set(run_dir_listing(run_dir)))

    # A finished run is not redone: the same command again only re-reads the results.
    stamps = {p: p.stat().st_mtime_ns for p in [run_dir / "student" / "model.safetensors",
                                                 run_dir / "eval" / "student.json"]}
    launch(run_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


# The streamed window (producers compute each epoch again, shards deleted behind the
# student): the harder path, and the one a store too large for its disk budget takes.
QUICK = ("data.demo_articles=12", "model.max_length=96", "model.doc_stride=32", "teacher.epochs=1",
         "student.epochs=1", "distill.lookahead_shards=2", "distill.store_mode=window")


@pytest.mark.slow
@pytest.mark.parametrize("overrides,models", [
    (("strategy.name=zero_shot",), ["model_zero_shot"]),
    (("strategy.name=translate_train", "strategy.translate_train=per_language"),
     [f"model_translate_train_{lang}" for lang in LANGUAGES]),
    (("strategy.name=translate_train",), ["model_translate_train"]),
    (("strategy.name=mixmrc",), ["model_mixmrc"]),
    (("strategy.teachers=[en,es]", "distill.aggregation=hyper", "distill.imp_sign=1"),
     ["teacher_en", "teacher_es", "student"]),
    (("strategy.teacher_data=mixmrc",), [*(f"teacher_mix_{lang}" for lang in LANGUAGES), "student"]),
], ids=["zero_shot", "translate_train_per_language", "translate_train_union", "mixmrc",
        "teacher_subset_hyper", "with_mix_teachers"])
def test_every_strategy_runs_and_is_evaluated(tmp_path, overrides, models):
    """The baselines and the teacher ablations of the paper run through the same entry
    point (a few steps each) and are scored on every language pair of the test split."""
    run_dir = tmp_path / "run"
    launch(run_dir, *QUICK, *overrides)
    summary = split_test_reports(run_dir)
    assert sorted(summary) == sorted(models)
    for report in summary.values():
        assert len(report["matrix"]["f1"]) == len(LANGUAGES) and set(report["per_language"]) == set(LANGUAGES)
    if "student" in models:
        manifest = json.loads((run_dir / "logits" / "manifest.json").read_text())
        assert sorted(manifest["teachers"]) == sorted(m[len("teacher_"):] for m in models if m != "student")


def interrupt_job(run_dir: Path, *overrides: str, when: Callable[[], bool], kill: Callable[[subprocess.Popen], None],
                  ranks: int = 2, env: dict[str, str] | None = None, timeout: float = 900) -> int:
    """Starts the README's command into `run_dir`, calls `kill(job)` as soon as `when()`
    holds and returns the job's exit code once it has ended; whatever is left of it then
    gets SIGKILL (its process group)."""
    command, env = train_command(run_dir, *overrides, ranks=ranks, env=env)
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (ready := when()) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if ready:
            kill(job)
        code = job.wait(timeout=300)  # a rank's death ends the others: the launcher stops them
    finally:
        with contextlib.suppress(ProcessLookupError):  # the job may have ended on its own
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert ready, f"the moment to kill {run_dir}'s job never came (job exit code {job.returncode})"
    return code


def kill_job_when(path: Path, run_dir: Path, *overrides: str, timeout: float = 900) -> None:
    """Starts the README's command into `run_dir` and kills the whole job (every rank, no
    clean-up: SIGKILL to its process group) as soon as `path` exists."""
    interrupt_job(run_dir, *overrides, when=path.exists, kill=lambda job: os.killpg(job.pid, signal.SIGKILL),
                  timeout=timeout)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_latest_checkpoint(tmp_path):
    """The whole job is killed (every rank, no clean-up) once the student has saved a
    checkpoint; the same command then resumes the student from it and finishes. The
    student's step trace shows where each rank resumed and that the shards it read after
    resuming were the rest of the epoch's order: every feature of D trained on exactly once
    per epoch (step for step against an uninterrupted run: tests/test_crash_drills.py)."""
    from dist_xqa.jobs import DISTILL_SET
    from dist_xqa.prepared import Prepared
    from dist_xqa.roles.trace import features_read, read_trace, trace_path

    run_dir = tmp_path / "run"
    overrides = (*QUICK, "student.epochs=2", "checkpoint.every=3", "run.trace_steps=true")
    kill_job_when(run_dir / "checkpoints" / "student" / "latest", run_dir, *overrides)
    assert not (run_dir / "student" / "DONE.json").exists(), "killed too late: the student had finished"

    launch(run_dir, *overrides)
    for rank in range(2):  # resumed at the checkpoint: neither from scratch nor past the last step taken
        (_, killed), (_, resumed) = read_trace(trace_path(run_dir, rank))
        assert 0 < resumed[0]["step"] <= killed[-1]["step"] + 1, (rank, resumed[0]["step"], killed[-1]["step"])
    features = Counter(int(f) for f in Prepared(run_dir).features(DISTILL_SET)["feature_id"])
    assert features_read(run_dir) == {0: features, 1: features}
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert all(f"{lang}: resumed" not in log for lang in LANGUAGES), "finished teachers are not retrained"
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert json.loads((run_dir / "student" / "DONE.json").read_text())["epochs"] == 2
    assert "student" in summary


def slurm_is_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_the_entry_point_runs_under_every_launcher(tmp_path, launcher):
    """torchrun and mpirun start the same world of 2 ranks, each with another ZeRO stage
    (Slurm: the next test)."""
    run_dir = tmp_path / "run"
    env = cpu_env()
    args = [f"run_dir={run_dir}", *QUICK]
    if launcher == "torchrun":
        command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"],
                   "dist_xqa/train.py", "--deepspeed", "ds_configs/zero1.json", *args]
    else:
        if shutil.which("mpirun") is None:
            pytest.skip("OpenMPI is not installed")
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PATH", "-x",
                   "DS_ACCELERATOR", "-x", "MASTER_PORT", sys.executable, "dist_xqa/train.py",
                   "--deepspeed", "ds_configs/zero3.json", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert sorted(summary) == ["student", *(f"teacher_{lang}" for lang in sorted(LANGUAGES))]
    assert "role plan: 2 rank(s)" in (run_dir / "logs" / "rank0.log").read_text()


def slurm_job(job: str) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Restarts, ExitCode, NumTasks, ...)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


@pytest.mark.slow
def test_sbatch_job_is_requeued_at_its_time_limit_and_finishes(tmp_path):
    """The README's sbatch script on a real single-node Slurm (.ci/run starts one with
    scripts/slurm_local.sh), 2 tasks, ZeRO-2 with CPU offload. Once the student has saved
    a checkpoint the job gets USR1, as Slurm sends it before the time limit
    (`--signal=USR1@120`): every rank checkpoints and exits 0, the script requeues the job,
    and the requeued job resumes the student from its checkpoint, keeps the finished
    teachers and completes with every model evaluated."""
    if not slurm_is_up():
        if os.environ.get("DIST_XQA_REQUIRE_SLURM"):
            pytest.fail("DIST_XQA_REQUIRE_SLURM is set (.ci/run started Slurm), but sinfo fails")
        pytest.skip("no Slurm cluster here (scripts/slurm_local.sh starts one, as root on Debian)")
    run_dir = tmp_path / "run"
    env = {**cpu_env(), "DS_CONFIG": "ds_configs/zero2_offload.json"}
    # the script's defaults are GPU ones: its documented CPU override, 2 tasks of 1 core
    cpu_only = ["--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1"]
    submit = subprocess.run(["sbatch", "--parsable", *cpu_only, f"--output={tmp_path}/slurm-%j.out",
                             "slurm/train_lbmrc.sh", f"run_dir={run_dir}", *QUICK, "student.epochs=2",
                             "checkpoint.every=3"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        latest = run_dir / "checkpoints" / "student" / "latest"
        deadline = time.monotonic() + 900
        while not latest.exists() and slurm_job(job)["JobState"] in ("PENDING", "RUNNING") \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert latest.exists(), f"the student never checkpointed: {slurm_job(job)['JobState']}"
        assert not (run_dir / "student" / "DONE.json").exists(), "signalled too late: the student had finished"
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        while slurm_job(job)["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") \
                and time.monotonic() < deadline + 600:
            time.sleep(2)
        state = slurm_job(job)
    finally:
        subprocess.run(["scancel", job], timeout=30)  # a no-op on a finished job
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"], state["NumTasks"]) == \
        ("COMPLETED", "0:0", "1", "2"), output[-3000:]
    assert f"requeueing job {job}" in output  # the first run's log is kept (--open-mode=append)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "student: resumed from" in log
    assert all(f"{lang}: resumed" not in log for lang in LANGUAGES), "finished teachers are not retrained"
    assert json.loads((run_dir / "student" / "DONE.json").read_text())["epochs"] == 2
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert sorted(summary) == ["student", *(f"teacher_{lang}" for lang in sorted(LANGUAGES))]
