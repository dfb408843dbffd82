"""The run directory's layout: the one module that knows where everything of a run lives.

    <run>/config.yaml                      the settings the run was started with
    <run>/logs/rank<R>.log                 each rank's log
    <run>/data/                            the demo corpus, when the run generates it
    <run>/prepared/                        prepared data (prepared.json, tokenizer/, sets/<name>/,
                                           test/<name>/, cache/)
    <run>/teachers/<lang>/                 LBMRC's branch teachers (Hugging Face format)
    <run>/models/<name>/                   the other strategies' phase-1 and baseline models
    <run>/student/                         the distilled student
    <run>/checkpoints/<role>/              each training group's DeepSpeed checkpoints
    <run>/logits/                          the logit store (its own layout: dist_xqa.logits); with
                                           distill.store_dir, only the run's progress and heartbeats
    <run>/skd/teacher_gen<e>/              self-distillation's frozen teacher of generation e
    <run>/eval/<model>.json, summary.json, table.txt   the results
    <run>/stages/<stage>.json              what each stage was made with (dist_xqa.stages)
    <run>/heartbeats/<role>.<rank>.json    each rank's sign of life (dist_xqa.waiting)
    <run>/trace/student.<rank>.jsonl       the student's per-step trace (dist_xqa.roles.trace)
    <run>/tb/<role>/                       TensorBoard logs

A role's name is the name of its checkpoints, heartbeats and TensorBoard folder:
teacher_<lang>, model_<name>, student or eval. Every other module asks this one for a
path and spells no folder name of its own, so a folder moves here alone.
"""
from __future__ import annotations

from pathlib import Path

DONE = "DONE.json"  # written into a model's folder once it is saved for good
STUDENT = "student"
EVAL = "eval"
TEACHER_PREFIX, MODEL_PREFIX = "teacher", "model"
_PHASE1_DIRS = {TEACHER_PREFIX: "teachers", MODEL_PREFIX: "models"}


class RunLayout:
    """The paths of the run directory `root` (nothing is created here)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- what the run starts from
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    def log_file(self, rank: int) -> Path:
        return self.root / "logs" / f"rank{rank}.log"

    @property
    def demo_data(self) -> Path:
        return self.root / "data"

    # -- prepared data (dist_xqa.prepared reads it, dist_xqa.prepare writes it)
    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def prepared_info(self) -> Path:
        return self.prepared / "prepared.json"

    @property
    def tokenizer(self) -> Path:
        return self.prepared / "tokenizer"

    @property
    def feature_cache(self) -> Path:
        return self.prepared / "cache"

    def prepared_set(self, name: str) -> Path:
        return self.prepared / "sets" / name

    def prepared_test_set(self, name: str) -> Path:
        return self.prepared / "test" / name

    # -- models
    def phase1_model(self, name: str, teacher: bool) -> Path:
        """A phase-1 model's folder: an LBMRC branch teacher, or another strategy's model."""
        return self.root / _PHASE1_DIRS[TEACHER_PREFIX if teacher else MODEL_PREFIX] / name

    def phase1_models(self) -> list[Path]:
        """Every phase-1 model folder present in the run, teachers first."""
        return [d for folder in _PHASE1_DIRS.values() for d in sorted((self.root / folder).glob("*")) if d.is_dir()]

    @property
    def student(self) -> Path:
        return self.root / STUDENT

    @staticmethod
    def done(model_dir: Path) -> Path:
        return model_dir / DONE

    @staticmethod
    def model_name(model_dir: Path) -> str:
        """A model's role name, under which its results, checkpoints and heartbeats go:
        teacher_<lang>, model_<name> or student."""
        prefix = {folder: prefix for prefix, folder in _PHASE1_DIRS.items()}.get(model_dir.parent.name)
        return f"{prefix}_{model_dir.name}" if prefix else model_dir.name

    # -- training state
    def checkpoints(self, role: str) -> Path:
        return self.root / "checkpoints" / role

    @property
    def store(self) -> Path:
        """The logit store's default place (distill.store_dir may put it elsewhere)."""
        return self.root / "logits"

    def logit_store(self, store_dir: str | None) -> Path:
        """Where the run's logits are: `store_dir` (distill.store_dir, shared between
        runs), or the default place in the run."""
        return Path(store_dir) if store_dir else self.store

    @property
    def stream(self) -> Path:
        """The run's own pacing files of its store (the student's progress, its producers'
        heartbeats: dist_xqa.logits.progress), wherever the logits are: the default
        store's place, so that runs sharing a store do not pace each other."""
        return self.store

    @property
    def skd(self) -> Path:
        return self.root / "skd"

    def skd_teacher(self, generation: int) -> Path:
        return self.skd / f"teacher_gen{generation}"

    # -- results
    @property
    def eval(self) -> Path:
        return self.root / EVAL

    def eval_result(self, model: str) -> Path:
        return self.eval / f"{model}.json"

    @property
    def eval_summary(self) -> Path:
        return self.eval / "summary.json"

    @property
    def eval_table(self) -> Path:
        return self.eval / "table.txt"

    # -- records, liveness, monitoring
    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_record(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    @property
    def heartbeats(self) -> Path:
        return self.root / "heartbeats"

    def heartbeat(self, role: str, rank: int) -> Path:
        return self.heartbeats / f"{role}.{rank}.json"

    def heartbeat_glob(self, role_pattern: str = "*") -> str:
        """The heartbeats of the roles matching `role_pattern`, as a glob under the run."""
        return f"{self.heartbeats.name}/{role_pattern}.*.json"

    @property
    def trace(self) -> Path:
        return self.root / "trace"

    def trace_file(self, rank: int) -> Path:
        return self.trace / f"{STUDENT}.{rank}.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    def tb(self, role: str) -> Path:
        return self.tensorboard / role

    # -- what each stage makes, as globs relative to the run (dist_xqa.stages removes them)
    def relative(self, path: Path) -> str:
        """`path` under the run, a folder with a trailing '/'."""
        return str(path.relative_to(self.root)) + "/"

    def role_outputs(self, role: str) -> list[str]:
        """A training or evaluating role's checkpoints, heartbeats and TensorBoard log."""
        return [self.relative(self.checkpoints(role)), self.heartbeat_glob(role), self.relative(self.tb(role))]

    def model_outputs(self, model_dir: Path) -> list[str]:
        """A phase-1 model and everything its training leaves."""
        return [self.relative(model_dir), *self.role_outputs(self.model_name(model_dir))]

    def distill_outputs(self) -> list[str]:
        """The student and what its training leaves (not the logit store: stages.py decides
        whether it goes with the student)."""
        return [self.relative(self.student), *self.role_outputs(STUDENT)[:1],
                self.relative(self.skd), *self.role_outputs(STUDENT)[1:], self.relative(self.trace)]

    def eval_outputs(self) -> list[str]:
        return [self.relative(self.eval), *self.role_outputs(EVAL)[1:]]

    def stage_outputs_hidden(self) -> tuple[str, ...]:
        """Prefixes of the outputs a user does not look for (named in no message)."""
        return (self.heartbeats.name + "/", self.relative(self.tensorboard), self.stages.name + "/")
