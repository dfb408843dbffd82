"""dist_xqa entry point: every rank of the world runs this file.

    deepspeed [--num_gpus N] dist_xqa/train.py --deepspeed ds_configs/zero2.json \
        [--config configs/X.yaml] [--stage prepare|teachers|distill|evaluate|all] [--redo NAME[,NAME]]
        [key=value ...]
    python dist_xqa/train.py --stage prepare [--config ...] [key=value ...]   # one process, CPUs

With no --config it runs the embedded default (the demo corpus and a tiny model). The
stages: the data preparation (tokenisation with run.num_proc processes; on its own,
`--stage prepare` needs no launcher, GPU or DeepSpeed, so a CPU job can do it before the
GPU job, which then finds it done; otherwise rank 0 does it while the other ranks wait on
its heartbeat); phase 1 trains the branch teachers (or a baseline's model) in concurrent role
groups; phase 2 streams teacher logits through the sharded store into the student; then
every model is evaluated. A finished stage is not redone; an interrupted one resumes. A
rerun whose settings differ from what a stage was made with stops and names the keys,
unless --redo names that stage: then it and the stages after it are removed and redone
(dist_xqa/stages.py). --redo may also name one phase-1 model (teacher_en, or en as under
<run>/teachers/): it alone is retrained, and the stages after phase 1 are redone.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the launchers: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist
import yaml

from dist_xqa import stages
from dist_xqa.config import ConfigError, RunConfig, batch_for_group, load_config
from dist_xqa.layout import RunLayout

log = logging.getLogger("dist_xqa")
PREPARE = "prepare"  # the stage, and the role whose heartbeat the other ranks wait on
STAGES = (PREPARE, *stages.STAGES, "all")
REQUEUE_MARKER = "DIST_XQA_REQUEUE_MARKER"  # env: a file to create when stopped by a signal


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default="ds_configs/zero2.json",
                   help="DeepSpeed JSON config (ZeRO stage, optimizer); precision is switched by the trainer")
    p.add_argument("--config", default=None, help="YAML run config (default: configs/demo.yaml, the embedded demo)")
    p.add_argument("--stage", choices=STAGES, default="all")
    p.add_argument("--redo", type=_redo_names, default=frozenset(), metavar="NAME[,NAME]",
                   help=f"remove and redo these stages ({', '.join(stages.STAGES)}) and the ones after them, "
                        "e.g. after changing a setting they were made with; or phase-1 models (teacher_<lang>, "
                        "model_<name>, or their directory names): those alone, and every stage after phase 1; or "
                        "store: the run's logit store alone (--redo distill keeps it while it matches)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. student.epochs=2 run_dir=/tmp/r")
    return p.parse_intermixed_args(argv)  # options may follow key=value overrides


def _redo_names(text: str) -> frozenset[str]:
    """The names --redo gives; which are valid depends on the config (the phase-1 models):
    stages.redo_targets checks them."""
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"--redo {text!r} names nothing; give stages ({', '.join(stages.STAGES)}) "
                                         "or phase-1 models (teacher_<lang>, model_<name>)")
    return names


def setup_logging(run_dir: Path, rank: int) -> None:
    log_file = RunLayout(run_dir).log_file(rank)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.handlers[:] = [file_handler, console]


def run(cfg: RunConfig, ds_config: dict, stage: str, redo: frozenset[str] = frozenset()) -> None:
    # Imported here so that a bad config is refused before torch.distributed, DeepSpeed or
    # the data pipeline is loaded.
    from dist_xqa.distributed import init_distributed, make_groups
    from dist_xqa.eval.stage import evaluate_all
    from dist_xqa.jobs import DISTILL_SET, model_dirs, phase1_jobs, trains_student
    from dist_xqa.prepared import Prepared
    from dist_xqa.roles.phase2 import run_phase2
    from dist_xqa.plan import plan_roles
    from dist_xqa.roles.skd import run_skd
    from dist_xqa.roles.supervised import train_job
    from dist_xqa.roles.xsta import run_xsta

    # The process groups' timeout is the run's stall timeout, not torch's fixed 30 minutes.
    ctx = init_distributed(timeout=timedelta(seconds=cfg.run.stall_timeout_s))
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    layout = RunLayout(cfg.run_path)
    setup_logging(cfg.run_path, rank)

    # Rank 0 checks what the run directory holds against the settings (and removes what
    # --redo redoes), then prepares the data, beating the preparation's heartbeat; the
    # other ranks wait on that heartbeat, not in a collective (whose fixed timeout a full-
    # scale tokenisation outlasts). A failure there (a changed setting, a language with no
    # data) stops every rank with rank 0's message, before any training. The beats carry
    # this launch's id, drawn by rank 0 (all ranks come here from start-up together), so a
    # beat left by an earlier launch never passes for this one's.
    launch = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(launch, src=0)
    if rank == 0:
        _prepare_beating(cfg, redo, launch[0])
    else:
        _wait_for_preparation(cfg, launch[0], rank)
    prepared = Prepared(cfg.run_path)

    jobs = phase1_jobs(cfg)
    strategy = cfg.strategy.name
    student = trains_student(cfg)
    # X-STA and self-distillation run their own teachers inside the student group: it spans
    # every rank; LBMRC's plan sizes producers and student (dist_xqa.plan). Teacher
    # groups get ranks in proportion to their work (features x epochs).
    plan = plan_roles(world, {job.name: len(prepared.features(job.train_set)) * cfg.teacher.epochs for job in jobs},
                      student_min_ranks=cfg.plan.student_min_ranks, producer_speed_ratio=cfg.plan.producer_speed_ratio,
                      producers="shared" if strategy in ("skd", "xsta") else cfg.plan.producers,
                      teacher_schedule=cfg.plan.teacher_schedule,
                      teacher_global_batch=cfg.teacher.global_batch_size,
                      student_global_batch=cfg.student.global_batch_size,
                      distill_work=(len(prepared.features(DISTILL_SET)) * cfg.student.epochs
                                    if strategy == "lbmrc" else None))
    if batch_error := _batch_error(cfg, plan, student):  # every rank has the same plan: all stop
        raise SystemExit(f"dist_xqa: configuration error: {batch_error}")
    # Without a global batch a step's rows follow the group sizes: an unfinished stage
    # made on another number of ranks is refused like a changed key (rank 0 reads the records).
    batches = stages.effective_batches(cfg, plan, student)
    error = [stages.batch_change(cfg, batches) if rank == 0 else None]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise SystemExit(f"dist_xqa: ConfigError: {error[0]}")
    groups = make_groups(plan, timeout=timedelta(seconds=cfg.run.stall_timeout_s))
    if rank == 0:
        log.info("role plan:\n%s", plan.describe())

    if stage in ("teachers", "all"):
        if rank == 0 and jobs:
            stages.record(cfg, "teachers", batches.get("teachers"))
        by_name = {job.name: job for job in jobs}
        for group in plan.teacher_groups_for(rank):  # one per round, in round order
            train_job(by_name[group.teacher], cfg, prepared, ds_config, groups[group.name], device)
    if student and stage in ("distill", "all"):
        if rank == 0:  # the student's record holds its phase-1 models' hashes
            stages.wait_for_phase1(cfg)
            stages.record(cfg, "distill", batches.get("distill"))
        phase2 = {"lbmrc": run_phase2, "skd": run_skd, "xsta": run_xsta}[strategy]
        phase2(cfg, prepared, ds_config, plan, groups, device)
    if stage in ("evaluate", "all"):
        # Every model this run makes, the same list on every rank (ranks that finished their
        # part early wait for the others' models); `--stage evaluate` scores the finished ones.
        models = model_dirs(cfg)
        if stage == "evaluate":
            models = [d for d in models if layout.done(d).exists()]
        if rank == 0:
            stages.record(cfg, "evaluate")
        evaluate_all(cfg, prepared, device, models)


def prepare_run(cfg: RunConfig, redo: frozenset[str], beat: Callable[[], None]) -> None:
    """What a run does before its roles start, on one process: checks the run directory
    against the settings (and removes what --redo redoes), prepares the data, records the
    settings. A config error raises ConfigError, a data error ValueError or OSError."""
    from dist_xqa.prepare import prepare

    stages.check_rerun(cfg, redo)
    prepare(cfg, beat)
    RunLayout(cfg.run_path).config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _prepare_beating(cfg: RunConfig, redo: frozenset[str], launch: str) -> None:
    """prepare_run on rank 0, beating the preparation's heartbeat (its step: units of work
    done; `launch`: this launch's id) and marking it finished, failed or stopped; a stop
    signal stops it at its next unit."""
    from dist_xqa.waiting import FAILED, FINISHED, STOPPED, Heartbeat, Preempted, stop_requested

    heartbeat = Heartbeat(RunLayout(cfg.run_path).heartbeat(PREPARE, 0), PREPARE)
    units = itertools.count(1)

    def beat() -> None:
        if stop_requested():
            raise Preempted("data preparation: stopped by a signal")
        heartbeat.beat(next(units), launch=launch)

    heartbeat.beat(0, force=True, launch=launch)
    try:
        prepare_run(cfg, redo, beat)
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"
        heartbeat.beat(state=STOPPED if isinstance(err, Preempted) else FAILED, force=True, launch=launch,
                       error=message)
        if isinstance(err, (ConfigError, ValueError, OSError)):
            raise SystemExit(f"dist_xqa: {message}") from None
        raise
    heartbeat.beat(state=FINISHED, force=True, launch=launch)


def _wait_for_preparation(cfg: RunConfig, launch: str, rank: int) -> None:
    """Every rank but 0: until rank 0's preparation of this launch has finished, as long as
    its heartbeat moves (run.stall_timeout_s without a beat: stopped, naming it and its
    log); rank 0's error, or its stop, ends the wait at once."""
    from dist_xqa.waiting import FAILED, FINISHED, STOPPED, Preempted, Stalled, StallWatch, read_beat, wait_until

    path = RunLayout(cfg.run_path).heartbeat(PREPARE, 0)

    def ready() -> bool:
        beat = read_beat(path)
        if beat is None or beat.detail.get("launch") != launch:
            return False  # rank 0 has not beaten yet in this launch
        if beat.state == FAILED:
            raise SystemExit(f"dist_xqa: {beat.detail.get('error')} (rank 0's data preparation, log {beat.log})")
        if beat.state == STOPPED:
            raise Preempted(f"rank {rank}: rank 0's data preparation was stopped by a signal")
        return beat.state == FINISHED

    watch = StallWatch(lambda: [path], cfg.run.stall_timeout_s, f"rank {rank} waiting for rank 0's data preparation",
                       expected=[PREPARE])
    try:
        wait_until(ready, watch)
    except Stalled as stalled:
        raise SystemExit(f"dist_xqa: {stalled}") from None


def prepare_stage(cfg: RunConfig, redo: frozenset[str]) -> None:
    """`--stage prepare`: the preparation alone, on this process, with no process group (a
    CPU job before the GPU job). Started by a launcher on several ranks, rank 0 alone
    prepares and the others have nothing to do."""
    from dist_xqa.distributed import launcher_env
    from dist_xqa.waiting import Preempted, stop_requested

    rank = int(launcher_env(dict(os.environ))["RANK"])
    setup_logging(cfg.run_path, rank)
    if rank != 0:
        log.info("--stage prepare runs on rank 0 alone: rank %d has nothing to do", rank)
        return

    def beat() -> None:
        if stop_requested():
            raise Preempted("data preparation: stopped by a signal")

    try:
        prepare_run(cfg, redo, beat)
    except (ConfigError, ValueError, OSError) as err:
        raise SystemExit(f"dist_xqa: {type(err).__name__}: {err}") from None
    log.info("prepared %s", RunLayout(cfg.run_path).prepared)


def _batch_error(cfg: RunConfig, plan, student: bool) -> str | None:
    """Why a role's global batch (teacher.global_batch_size, student.global_batch_size)
    does not split evenly over one of the plan's groups, or None."""
    teacher_groups = [group for round_ in plan.teacher_rounds for group in round_]
    roles = [("teacher", cfg.teacher, teacher_groups)] + ([("student", cfg.student, [plan.student])] if student else [])
    for key, train, groups in roles:
        for group in groups:
            try:
                batch_for_group(train, group.size)
            except ValueError:
                step, wanted = math.lcm(*(g.size for g in groups)), train.global_batch_size
                near = sorted({max(step, wanted // step * step), -(-wanted // step) * step})
                return (f"{key}.global_batch_size {train.global_batch_size} does not split over the {group.size} ranks "
                        f"of group {group.name}: it must be a multiple of every {key} group's size in this role plan "
                        f"({', '.join(f'{g.name}: {g.size}' for g in groups)}), e.g. {' or '.join(map(str, near))}")
    return None


def main(argv: list[str] | None = None) -> None:
    from dist_xqa.distributed import load_ds_config

    from dist_xqa.models import check_model_name

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        ds_config = load_ds_config(args.deepspeed)
        check_model_name(cfg.model.name)  # before any data work or process group
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"dist_xqa: configuration error: {err}") from None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dist_xqa.waiting import Preempted, install_stop_signal, stop_signal

    # Slurm's USR1 before the time limit (slurm/train_lbmrc.sh) and SIGTERM (preemption or
    # scancel, Slurm's KillWait before SIGKILL): training groups checkpoint and every rank
    # exits 0 (srun --kill-on-bad-exit would cut the others' checkpoints short). After USR1
    # the marker the script names tells it to requeue the job, which resumes; after
    # SIGTERM none is written: Slurm requeues a preempted job itself (PreemptMode=REQUEUE),
    # and a cancelled one stays cancelled.
    install_stop_signal()
    try:
        if args.stage == PREPARE:
            prepare_stage(cfg, args.redo)
        else:
            run(cfg, ds_config, args.stage, args.redo)
    except Preempted as stop:
        log.warning("%s; exiting for the requeued job to resume", stop)
        if (marker := os.environ.get(REQUEUE_MARKER)) and stop_signal() == signal.SIGUSR1:
            Path(marker).touch()


if __name__ == "__main__":
    main()
