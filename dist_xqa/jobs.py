"""What a run trains, by strategy: its phase-1 jobs (each model trained with NLL: a branch
teacher or a baseline's model), the prepared set each job and the student read, and the
folder each model is saved in. A pure function of the config, read by the preparation,
the roles, the stage records and the disk estimate alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dist_xqa.config import RunConfig
from dist_xqa.layout import RunLayout

DISTILL_SET = "distill"  # LBMRC's distillation set D
SKD_PHASE1_JOB = "skd_phase1"  # self-distillation's source-only fine-tuning (<run>/models/skd_phase1)
STUDENT_STRATEGIES = ("lbmrc", "skd", "xsta")  # the strategies whose phase 2 trains a student
# The student's training set, by strategy (its dev set: the same name + ".dev"):
# LBMRC reads D; SKD samples from every question x passage pair; X-STA pairs each
# language's version of an example (question and passage in it) with the source's.
STUDENT_SETS = {"lbmrc": DISTILL_SET, "skd": "mixmrc", "xsta": "tt_union"}


def dev_set(train_set: str) -> str:
    return f"{train_set}.dev"


@dataclass(frozen=True)
class Job:
    """One model trained with NLL in phase 1: a branch teacher or a baseline model."""

    name: str  # teacher language, or the baseline's name
    train_set: str  # prepared set names
    dev_set: str
    seed_offset: int = 0  # added to the run's seed (initialisation and data order)


def phase1_jobs(cfg: RunConfig) -> list[Job]:
    """The models phase 1 trains, by strategy:
    - lbmrc: one teacher per teacher language on its language branch D_k (or, with
      `strategy.teacher_data: mixmrc`, "w/ mix": as many teachers, mix_<lang> for each
      teacher language's slot, all on the mixMRC set with different seeds);
    - zero_shot: one model on the source language; mixmrc: one model on every pair;
    - translate_train: one model per language (per_language) or one on the union;
    - skd: the optional source-language phase 1; xsta: none."""
    s = cfg.strategy
    if s.name == "xsta":  # one model on parallel pairs, no phase 1
        return []
    if s.name == "skd":  # optional phase 1: source-language fine-tuning (dist_xqa.roles.skd)
        return [Job(SKD_PHASE1_JOB, "zero_shot", dev_set("zero_shot"))] if s.skd.phase1 else []
    if s.name == "lbmrc" and s.teacher_data == "branch":
        return [Job(lang, f"branch_{lang}", dev_set(f"branch_{lang}")) for lang in cfg.teacher_languages]
    if s.name == "lbmrc":
        return [Job(f"mix_{lang}", "mixmrc", dev_set("mixmrc"), seed_offset=i)
                for i, lang in enumerate(cfg.teacher_languages)]
    if s.name == "translate_train" and s.translate_train == "per_language":
        return [Job(f"translate_train_{lang}", f"tt_{lang}", dev_set(f"tt_{lang}")) for lang in cfg.train_languages]
    name = {"zero_shot": "zero_shot", "mixmrc": "mixmrc", "translate_train": "translate_train"}[s.name]
    set_name = {"zero_shot": "zero_shot", "mixmrc": "mixmrc", "translate_train": "tt_union"}[s.name]
    return [Job(name, set_name, dev_set(set_name))]


def trains_student(cfg: RunConfig) -> bool:
    return cfg.strategy.name in STUDENT_STRATEGIES


def job_dir(cfg: RunConfig, job: Job) -> Path:
    """Where a phase-1 job's model is saved: LBMRC's teachers under teachers/, the other
    strategies' models under models/; with `phase1_from`, in that run's directory (the
    model is borrowed as it is: every consumer, from training to the stage records and
    the evaluation, finds it there and none writes it)."""
    return RunLayout(phase1_root(cfg)).phase1_model(job.name, teacher=cfg.strategy.name == "lbmrc")


def phase1_root(cfg: RunConfig) -> Path:
    """The run directory the phase-1 models live in: this run's, or `phase1_from`."""
    return Path(cfg.phase1_from) if cfg.phase1_from else cfg.run_path


def borrowed(cfg: RunConfig, model_dir: Path) -> bool:
    """Whether `model_dir` is a phase-1 model of another run (phase1_from)."""
    return cfg.phase1_from is not None and model_dir in phase1_dirs(cfg).values()


def phase1_dirs(cfg: RunConfig) -> dict[str, Path]:
    """Phase-1 model name -> its output directory."""
    return {job.name: job_dir(cfg, job) for job in phase1_jobs(cfg)}


def model_dirs(cfg: RunConfig) -> list[Path]:
    """Every model the run makes: its phase-1 models, then the student."""
    layout = RunLayout(cfg.run_path)
    return list(phase1_dirs(cfg).values()) + ([layout.student] if trains_student(cfg) else [])


def store_options(cfg: RunConfig) -> dict:
    """The parts of the logit store's key (logits.Manifest) that the config sets: the
    logits' dtype, their top-k, and the placebo's shuffle seed. The rest of the key are the
    features and the teachers' weights."""
    kd = cfg.distill
    return {"dtype": kd.logits_dtype, "topk": kd.store_topk, "placebo": cfg.seed if kd.placebo_shuffle else None}
