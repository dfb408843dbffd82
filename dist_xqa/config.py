"""Run configuration: YAML + dataclasses, validated once at start-up.

A run is described by one YAML file (configs/*.yaml; the embedded default is
configs/demo.yaml) plus `key.sub=value` overrides from the command line. Every key is a
field of the dataclasses below: an unknown key, a wrong type or an inconsistent value is
refused before any rank trains, with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

STRATEGIES = ("lbmrc", "zero_shot", "translate_train", "mixmrc", "xsta", "skd")
NORMALIZATIONS = ("squad", "mlqa")  # EM/F1 as each official script computes them (dist_xqa.eval.metrics)


class ConfigError(ValueError):
    """A configuration problem; the message names the key (or file) to fix."""


@dataclass
class TrainCorpusConfig:
    """`data.train`: the parallel training corpus, one SQuAD v1.1 / JSON Lines file per
    language, aligned by question id (an id some files lack stays in the pairs of the
    files that have it)."""

    folder: str | None = None  # required for data.source squad; the demo generates its own
    pattern: str = "*.{lang}.json"
    languages: list[str] = field(default_factory=lambda: ["en", "es", "de"])
    # Article index ranges [start, stop) per split (train, dev, test). Articles in no
    # range are not used. null: 70/10/20 % of articles when there is no data.test
    # (the test split is the test set), else 90/10 (train/dev), or all train when
    # data.dev is a separate corpus.
    split: dict[str, list[int]] | None = None


@dataclass
class DevCorpusConfig:
    """`data.dev`: a separate parallel corpus for model selection (e.g. SQuAD dev and its
    translations); each job's dev set is built from it with the job's own builder."""

    folder: str | None = None
    pattern: str = "*.{lang}.json"
    languages: list[str] = field(default_factory=list)
    articles: list[int] | None = None  # [start, stop): only these articles (null: all)


TEST_FORMATS = ("parallel", "mlqa")
MLQA_PATTERN = "test-context-{context}-question-{question}.json"


@dataclass
class EvalSetConfig:
    """One entry of `data.test`: a named evaluation corpus, scored on every question of
    its files as the official scripts score a prediction file."""

    name: str = ""
    folder: str | None = None
    # parallel: one file per language, "{lang}" filled in (default "*.{lang}.json");
    # mlqa: one file per pair, "{context}" and "{question}" filled in (default MLQA's
    # test-context-{context}-question-{question}.json).
    pattern: str | None = None
    languages: list[str] = field(default_factory=list)
    normalization: str = "squad"  # squad (XQuAD, TyDiQA) | mlqa (MLQA, by the context language)
    format: str = "parallel"  # parallel (every question x passage pair) | mlqa (each file on its own)
    articles: list[int] | None = None  # parallel only: [start, stop) article range (null: all)

    @property
    def file_pattern(self) -> str:
        if self.pattern:
            return self.pattern
        return MLQA_PATTERN if self.format == "mlqa" else "*.{lang}.json"


@dataclass
class DataConfig:
    source: str = "demo"  # "demo" (generated into the run directory) or "squad" (data.train.folder)
    train: TrainCorpusConfig = field(default_factory=TrainCorpusConfig)
    dev: DevCorpusConfig | None = None  # null: the split.dev articles of data.train
    # Named test sets; empty: the split.test articles of data.train are the one test set.
    test: list[EvalSetConfig] = field(default_factory=list)
    source_lang: str = "en"  # the language the others were translated from
    normalization: str = "squad"  # squad | mlqa: how dev EM/F1 (model selection) normalise answers
    demo_articles: int = 60
    demo_noise: float | None = None  # null = the demo's documented default
    max_train_examples: int | None = None  # cap per built training set (quick runs)


@dataclass
class ModelConfig:
    # "tiny": a small BERT built from `tiny` with a WordPiece tokenizer trained on the
    # corpus; anything else is a Hugging Face model name or local path.
    name: str = "tiny"
    tiny: dict[str, int] = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 256,
            "vocab_size": 2000,
        }
    )
    max_length: int = 160
    doc_stride: int = 64

    def __post_init__(self) -> None:
        # `model.tiny.num_hidden_layers=1` changes one size and keeps the others (an
        # entry left out would otherwise fall back to BertConfig's bert-base default).
        self.tiny = {**ModelConfig.__dataclass_fields__["tiny"].default_factory(), **self.tiny}


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 1e-5
    micro_batch_size: int = 16  # per rank; with global_batch_size: the largest micro-batch allowed
    grad_accum: int = 1  # with global_batch_size: derived (leave it at 1)
    weight_decay: float = 0.005
    # Linear warmup over this fraction of the optimizer steps, then linear decay to 0
    # (DeepSpeed's WarmupDecayLR in the engine).
    warmup_ratio: float = 0.1
    # Rows per optimizer step over the whole role group, whatever its number of ranks:
    # see batch_for_group. null: micro_batch_size x grad_accum x the group's ranks.
    global_batch_size: int | None = None


def batch_for_group(train: TrainConfig, group_size: int) -> TrainConfig:
    """`train` with micro_batch_size and grad_accum as a group of `group_size` ranks runs
    them. With global_batch_size each rank takes global / group_size rows a step, in
    grad_accum micro-batches of the largest size up to micro_batch_size that divides them
    evenly, so the step's rows, and with them the hyperparameters, are the same on any
    number of ranks. ValueError when group_size does not divide global_batch_size (train.py
    refuses such a plan at start-up, naming the group)."""
    if train.global_batch_size is None:
        return train
    per_rank, rest = divmod(train.global_batch_size, group_size)
    if rest or not per_rank:
        raise ValueError(f"global_batch_size {train.global_batch_size} does not split over {group_size} ranks")
    accum = next(a for a in range(-(-per_rank // train.micro_batch_size), per_rank + 1) if per_rank % a == 0)
    return dataclasses.replace(train, micro_batch_size=per_rank // accum, grad_accum=accum)


@dataclass
class DistillConfig:
    aggregation: str = "imp"  # imp | hyper
    imp_sign: float = -1.0  # -1: confident teachers count more (paper text); +1: printed Eq. 7
    weights: dict[str, float] | None = None  # hyper: fixed weight per teacher (default 1/K)
    lambda_nll: float = 0.5
    lambda_kd: float = 0.5
    tau: float = 2.0
    lookahead_shards: int = 8
    store_mode: str = "window"  # window (bounded disk) | cache (keep shards for later epochs)
    disk_budget_gb: float = 10.0  # cache mode: above it, fall back to window deletion
    # The paper's precompute: every shard of D for every teacher is written once before the
    # student's first step (no look-ahead bound), and read from disk in every epoch. Needs
    # store_mode cache with a disk_budget_gb that holds D (checked at start-up); nothing is
    # evicted. false: streamed a look-ahead ahead of the student.
    precompute: bool = False
    logits_dtype: str = "float16"  # float16 | bfloat16
    # Store each teacher logit row as its top k logits, their positions and the log-sum-exp
    # of the rest (4k + 4 bytes a row instead of 2L); null: dense. See benchmarks/RESULTS.md.
    store_topk: int | None = None
    # A control (lbmrc): each shard's teacher logit rows are moved to other rows of the
    # shard (seeded), so the student gets logits of the same scale but no information.
    placebo_shuffle: bool = False
    # Where the logit store is (lbmrc): null, <run_dir>/logits; a directory shared by the
    # runs of a sweep (on a file system every node sees), read and filled by every student
    # whose teachers, features, tokenizer, dtype and top-k match (dist_xqa.logits.manifest).
    # Needs store_mode cache: no student deletes what another reads.
    store_dir: str | None = None


@dataclass
class XstaConfig:
    """`strategy.xsta`: X-STA (Cao et al. 2023). Defaults are the paper's unless marked."""

    # The source side of every training pair (the target side: every training language,
    # the source's own included: S = T pairs are part of training). null: data.source_lang
    # (the paper: English).
    source_lang: str | None = None
    # Encoder layer (counted from 1) where the target attends to the source. null: two thirds
    # of the depth, rounded (the paper: 8 of 12).
    share_layer: int | None = None
    gdks: bool = True  # gradient-disentangled sharing; false: plain cross-attention ("w/o GDKS")
    lambda0: float = 0.3  # lambda = w * lambda0 + b, w and b trainable from 1 and 0 (paper)
    # Which attention lambda weighs: self (the paper: (1 - lambda) cross + lambda self) or
    # cross (the public code alibaba/EasyNLP X-STA: lambda cross + (1 - lambda) self).
    mix_on: str = "self"
    alpha: float = 0.2  # alpha * MRC_src + (1 - alpha) * MRC_tgt (paper)
    gamma: float = 0.1  # teacher-guided calibration loss weight (paper); 0: "w/o calibration"
    # At inference average (p_T|S + p_T) / 2 when the test example's source-language version
    # exists; false: p_T alone ("calibration off at inference").
    calibrate_at_inference: bool = True
    # Evaluation (translate-test, the paper): a test example whose source-language version is
    # in its set (parallel sets: the set's own source file, an oracle translation) is scored
    # from the pair; others by p_T alone. false: p_T alone everywhere. Either way the eval
    # output also holds p_T alone; this key and calibrate_at_inference act at evaluation only
    # (`--stage evaluate strategy.xsta.translate_test=false` rescores without retraining).
    translate_test: bool = True
    # Normalise the final states the calibration attention reads with batch token statistics
    # (padding excluded; running statistics at inference); false: "w/o normalisation".
    normalize: bool = True
    # Whose statistics (the paper leaves it open): side, one set for the source side and one
    # for the target side (batches here mix target languages; the public code keeps a set per
    # language and batches one language pair) | shared, one set over both sides' tokens.
    norm_stats: str = "side"
    norm_eps: float = 1e-8  # (paper)
    sentence_weight: float = 0.05  # sentence-level InfoNCE (paper); 0: "w/o sentence alignment"
    infonce_tau: float = 0.05  # InfoNCE temperature on cosine similarities (paper)
    token_weight: float = 0.05  # token-level alignment entropy (paper); 0: "w/o token alignment"
    # masked: mean over real target tokens (paper); pair: padding rows included plus the
    # transposed source-to-target term (public code).
    alignment: str = "masked"
    # Which states token alignment reads (the paper leaves it open): final, the final layer's,
    # as sentence alignment | share, those entering the sharing layer (share_layer), where the
    # public code takes its alignment entropy.
    alignment_layer: str = "final"


@dataclass
class SkdConfig:
    """`strategy.skd`: self-knowledge distillation with mAP@k (Carrino et al. 2023).
    Defaults are the paper's; "public code" is ccasimiro88/self-distillation-gxlt-qa."""

    # Phase 1: fine-tune on the source language alone, with the teacher.* section (epochs,
    # lr, batch; the public code: 2 epochs, lr 3e-5, batch 6), then self-distil from it
    # (phase 2, with the student.* section). false: phase 2 starts from `init_from`, or
    # from model.name when init_from is null.
    phase1: bool = True
    init_from: str | None = None  # a QA checkpoint (name or path) phase 2 starts from
    # Cross-lingual sampling: each id in the source language plus this many target languages,
    # drawn anew each epoch (seeded by the run's seed and the epoch), every question x
    # passage pair among them.
    # null: every target language (the public code samples 5 of its 6).
    sampled_languages: int | None = None
    alpha_ce: float = 1.0  # span cross-entropy weight (paper, public code); 0: the "w/o ce" row
    # The KL weight alpha_kl: map (the paper's mAP@k of the teacher), mrr (the public code's
    # "mAP@k": first hit only in [gold - 5, gold + 4]), fixed (`alpha_kl`), or none (no
    # teacher: cross-entropy on the sampled set, the "w/ ce" row).
    coefficient: str = "map"
    alpha_kl: float = 1.0  # the coefficient when `coefficient: fixed` (paper, public code: 1)
    map_k: int = 10  # teacher predictions ranked (paper)
    map_delta: int = 5  # a hit lies within +-delta tokens of the gold position; normaliser 2*delta (paper)
    map_reduction: str = "batch"  # batch: one coefficient per batch (paper) | example: one per example
    temperature: float = 2.0  # KL temperature (paper, public code)
    tau_squared: bool = False  # multiply the KL by temperature^2 (public code; the paper does not)
    # How both terms reduce their start and end parts, the CE's and the KL's alike: sum (the
    # paper's Eq. 6) | mean (public code; half the loss, the same CE/KL balance).
    kl_start_end: str = "sum"


@dataclass
class StrategyConfig:
    name: str = "lbmrc"
    # lbmrc: the teachers to distil from (default: every training language); a subset
    # leaves the distillation set D unchanged and renormalises fixed weights.
    teachers: list[str] | None = None
    teacher_data: str = "branch"  # branch | mixmrc ("w/ mix": mixMRC-trained teachers)
    add_english: bool = True  # add the English branch to every non-English branch
    translate_train: str = "union"  # per_language (one model each) | union
    xsta: XstaConfig = field(default_factory=XstaConfig)  # strategy.name: xsta
    skd: SkdConfig = field(default_factory=SkdConfig)  # strategy.name: skd


@dataclass
class EvalConfig:
    n_best: int = 20
    max_answer_length: int = 30
    batch_size: int = 64
    select_on_dev: bool = True  # keep the epoch with the best dev F1


@dataclass
class RunSettings:
    """`run`: how long roles wait for each other (dist_xqa/waiting.py)."""

    # A rank waits for another role as long as its heartbeat moves; this long without a
    # beat (or a failed beat) stops it, naming the stalled role, its step and its log.
    # Also the process groups' timeout, so rank 0's data preparation gets this long.
    stall_timeout_s: float = 1800.0
    # Rank 0 estimates the run's peak disk use after data preparation and refuses a run
    # that will not fit the free space of run_dir (dist_xqa/disk.py); false: skip it.
    check_disk: bool = True
    # A debug trace: each student rank writes what every step trained on (feature ids,
    # teachers' logit checksums, the exact loss) to <run>/trace/ (dist_xqa/roles/trace.py).
    # It reads the losses back after every step: off for real runs.
    trace_steps: bool = False
    # DataLoader worker processes assembling the student's micro-batches: auto (2 on a GPU
    # host; none on CPU, where the read-ahead thread does it and workers would take cores
    # from the ranks) or a number (0: in the read-ahead thread). The same batches either way.
    loader_workers: int | str = "auto"
    # Processes that tokenise in the data preparation (dist_xqa/prepare.py, `--stage
    # prepare`): auto (every core this process may use) or a number. The same features either way.
    num_proc: int | str = "auto"


@dataclass
class MonitorConfig:
    """`monitor`: TensorBoard logging (dist_xqa/monitor.py)."""

    # Optimizer steps between writes of the per-step scalars a student keeps on the device
    # (losses, teacher weights, lr, samples_per_second): each write is one host sync.
    every: int = 10


@dataclass
class CheckpointConfig:
    every: int = 200  # optimizer steps between DeepSpeed checkpoints (and at every epoch end)
    keep: int = 2  # the newest `keep` checkpoints of each group are kept, older ones removed


@dataclass
class PlanConfig:
    """`plan`: how the ranks are split among roles (dist_xqa/plan.py). Teacher groups
    get ranks in proportion to their training features either way."""

    student_min_ranks: int = 1  # the smallest student group beside dedicated producers
    # auto: dedicated producer ranks when the world has room for student_min_ranks beside
    # one producer per teacher, else shared; dedicated (refused when there is no room);
    # shared: every rank is a student rank and produces too.
    producers: str = "auto"
    # A producer rank's logit rows/s over a student rank's features/s (a forward against
    # a forward + backward: 3). Producers are sized so ratio x producers >= student ranks;
    # set it below the measured ratio to keep the store further ahead.
    producer_speed_ratio: float = 3.0
    # balanced: the fewest rounds of concurrent teacher groups, ranks in proportion to work;
    # sequential (the paper's pipeline): every teacher a round of its own on every rank, and
    # in phase 2 every rank produces part of every teacher's logits and trains the student.
    teacher_schedule: str = "balanced"


@dataclass
class RunConfig:
    name: str = "demo"
    run_dir: str | None = None  # default runs/<name> under the working directory
    seed: int = 0
    # Another run directory whose finished phase-1 models (LBMRC's teachers, SKD's phase-1
    # model) this run uses as they are, training none of its own (dist_xqa.jobs.job_dir);
    # refused when that run's data or model settings differ (dist_xqa.stages). null: train them.
    phase1_from: str | None = None
    run: RunSettings = field(default_factory=RunSettings)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    teacher: TrainConfig = field(default_factory=TrainConfig)
    student: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    @property
    def train_languages(self) -> list[str]:
        return list(self.data.train.languages)

    @property
    def teacher_languages(self) -> list[str]:
        return list(self.strategy.teachers) if self.strategy.teachers else self.train_languages

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose
    (an int where a float is expected). Raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for candidate in inner:  # the first member that takes the value (int | str: 2 or "auto")
            try:
                return _coerce(value, candidate, key)
            except ConfigError:
                pass
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-5 (no dot) as a string; users write learning rates so.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in the raw mapping; a numeric part indexes a list (`data.test.0.folder`)."""
    node: Any = raw
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or part
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{where}' is a list of {len(node)}; "
                                  f"use an index 0..{len(node) - 1}")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{parts[depth - 1]}' is not a section")
        if last:
            node[part] = value
            return
        if node.get(part) is None:
            node[part] = {}
        node = node[part]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (default: the embedded demo), apply `key=value`
    overrides (values parsed as YAML), validate, and return it."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:  # a directory, no permission, not text
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. student.epochs=2)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{key.strip()}': value {text!r} is not valid YAML: {err}") from None
        _set_path(raw, key.strip(), value)
    try:
        cfg = _build(RunConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    validate(cfg)
    return cfg


def _check_xsta(need, cfg: RunConfig) -> None:
    x, key = cfg.strategy.xsta, "strategy.xsta"
    need(x.source_lang is None or x.source_lang in cfg.train_languages,
         f"{key}.source_lang '{x.source_lang}' is not a training language {cfg.train_languages}; "
         "leave it null to use data.source_lang")
    layers = cfg.model.tiny["num_hidden_layers"] if cfg.model.name == "tiny" else None
    need(x.share_layer is None or x.share_layer >= 1, f"{key}.share_layer counts from 1, got {x.share_layer}")
    need(x.share_layer is None or layers is None or x.share_layer <= layers,
         f"{key}.share_layer {x.share_layer} is deeper than the {layers} layers of model.tiny")
    need(x.mix_on in ("self", "cross"), f"{key}.mix_on must be self (paper) or cross (public code), got '{x.mix_on}'")
    need(0 <= x.alpha <= 1, f"{key}.alpha must be in [0, 1], got {x.alpha}")
    for name in ("gamma", "sentence_weight", "token_weight"):
        need(getattr(x, name) >= 0, f"{key}.{name} must be >= 0 (0 switches the term off), got {getattr(x, name)}")
    need(x.infonce_tau > 0, f"{key}.infonce_tau must be positive, got {x.infonce_tau}")
    need(x.norm_eps > 0, f"{key}.norm_eps must be positive, got {x.norm_eps}")
    need(x.alignment in ("masked", "pair"),
         f"{key}.alignment must be masked (paper) or pair (public code), got '{x.alignment}'")
    need(x.alignment_layer in ("final", "share"),
         f"{key}.alignment_layer must be final (the final layer's states) or share (the states entering "
         f"{key}.share_layer), got '{x.alignment_layer}'")
    need(x.norm_stats in ("side", "shared"),
         f"{key}.norm_stats must be side (statistics per side) or shared (one set over both sides), "
         f"got '{x.norm_stats}'")


def _check_skd(need, cfg: RunConfig) -> None:
    k, key = cfg.strategy.skd, "strategy.skd"
    targets = len(cfg.train_languages) - 1
    need(k.init_from is None or not k.phase1,
         f"{key}.init_from is given: set {key}.phase1: false (phase 2 starts from one or the other)")
    need(k.sampled_languages is None or 0 <= k.sampled_languages <= targets,
         f"{key}.sampled_languages must be in 0..{targets} (the target languages), or null for all of them; "
         f"got {k.sampled_languages}")
    need(k.coefficient in ("map", "mrr", "fixed", "none"),
         f"{key}.coefficient must be map (paper), mrr (public code), fixed or none, got '{k.coefficient}'")
    need(k.alpha_ce >= 0 and k.alpha_kl >= 0, f"{key}.alpha_ce and {key}.alpha_kl must be >= 0")
    need(k.alpha_ce > 0 or k.coefficient != "none",
         f"{key}: alpha_ce is 0 and coefficient is none: nothing to train on")
    need(k.map_k >= 1 and k.map_delta >= 1, f"{key}.map_k and {key}.map_delta must be >= 1")
    need(k.map_reduction in ("batch", "example"),
         f"{key}.map_reduction must be batch (paper) or example, got '{k.map_reduction}'")
    need(k.temperature > 0, f"{key}.temperature must be positive, got {k.temperature}")
    need(k.kl_start_end in ("sum", "mean"),
         f"{key}.kl_start_end must be sum (paper) or mean (public code), got '{k.kl_start_end}'")
    # mAP@k ranks the teacher's map_k best positions; a top-k store gives every position past
    # its k kept ones the same logit, so ranks past k would be ties in arbitrary order.
    store_topk = cfg.distill.store_topk
    need(cfg.strategy.name != "skd" or k.coefficient not in ("map", "mrr") or store_topk is None
         or store_topk >= k.map_k,
         f"distill.store_topk ({store_topk}) is below {key}.map_k ({k.map_k}): {k.coefficient} ranks the "
         f"teacher's {k.map_k} best positions and the store keeps {store_topk}; set distill.store_topk to at "
         f"least {k.map_k}, or null (dense), or {key}.map_k to at most {store_topk}")


def _check_range(need, rng: list[int] | None, key: str) -> None:
    if rng is not None:
        need(len(rng) == 2 and 0 <= rng[0] < rng[1], f"{key} must be [start, stop) with start < stop, got {rng}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks a user can act on. Data-dependent checks (a language with no
    file) happen when the data is opened, still before any rank trains."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    d, s, k = cfg.data, cfg.strategy, cfg.distill
    need(d.source in ("demo", "squad"), f"data.source must be 'demo' or 'squad', got '{d.source}'")
    tr = d.train
    need(d.source != "squad" or bool(tr.folder), "data.train.folder is required when data.source is 'squad'")
    need(d.source != "demo" or not tr.folder,
         "data.train.folder is for data.source 'squad'; the demo generates its own corpus")
    need(len(tr.languages) > 0, "data.train.languages is empty")
    need(len(set(tr.languages)) == len(tr.languages), f"data.train.languages has duplicates: {tr.languages}")
    need("{lang}" in tr.pattern, f"data.train.pattern must contain {{lang}}, got '{tr.pattern}'")
    need(d.source_lang in tr.languages,
         f"data.source_lang '{d.source_lang}' is not in data.train.languages {tr.languages}")
    need(d.normalization in NORMALIZATIONS, f"data.normalization must be squad or mlqa, got '{d.normalization}'")
    if tr.split is not None:
        unknown = sorted(set(tr.split) - {"train", "dev", "test"})
        need(not unknown, f"data.train.split: unknown split(s) {unknown}; use train, dev and test")
        need("train" in tr.split, "data.train.split needs a train range")
        for name, rng in tr.split.items():
            need(len(rng) == 2 and 0 <= rng[0] <= rng[1], f"data.train.split.{name} must be [start, stop), got {rng}")
        need(d.dev is not None or "dev" in tr.split or not cfg.eval.select_on_dev,
             "data.train.split has no dev range and data.dev is null: give split.dev, a data.dev corpus, "
             "or eval.select_on_dev: false")
        need(bool(d.test) or "test" in tr.split,
             "data.train.split has no test range and data.test is empty: nothing to report on")
    if d.dev is not None:
        need(bool(d.dev.folder), "data.dev.folder is required (or set data.dev: null to use data.train's split.dev)")
        need("{lang}" in d.dev.pattern, f"data.dev.pattern must contain {{lang}}, got '{d.dev.pattern}'")
        lacking = [lang for lang in tr.languages if lang not in d.dev.languages]
        need(not lacking, f"data.dev.languages {d.dev.languages} lacks training language(s) {lacking}: "
                          "each job is selected on its own set built from the dev corpus")
        _check_range(need, d.dev.articles, "data.dev.articles")
    names = [t.name for t in d.test]
    for i, t in enumerate(d.test):
        where = f"data.test[{i}]" + (f" ({t.name})" if t.name else "")
        need(bool(t.name) and "/" not in t.name and not t.name.startswith("."),
             f"{where}: name is required (a plain name, e.g. xquad)")
        need(names.count(t.name) == 1, f"{where}: the name '{t.name}' is used by two test sets")
        need(bool(t.folder), f"{where}: folder is required")
        need(t.format in TEST_FORMATS, f"{where}: format must be one of {', '.join(TEST_FORMATS)}, got '{t.format}'")
        need(t.normalization in NORMALIZATIONS, f"{where}: normalization must be squad or mlqa, got '{t.normalization}'")
        need(bool(t.languages) and len(set(t.languages)) == len(t.languages),
             f"{where}: languages must be a non-empty list without duplicates, got {t.languages}")
        placeholders = ("{context}", "{question}") if t.format == "mlqa" else ("{lang}",)
        for ph in placeholders:
            need(ph in t.file_pattern, f"{where}: pattern '{t.file_pattern}' must contain {ph} for format {t.format}")
        need(t.format == "parallel" or t.articles is None, f"{where}: articles is for format parallel only")
        _check_range(need, t.articles, f"{where}.articles")
    need(s.name in STRATEGIES, f"strategy.name must be one of {', '.join(STRATEGIES)}, got '{s.name}'")
    if s.teachers is not None:
        need(len(s.teachers) > 0, "strategy.teachers is empty; leave it out to use every language")
        for lang in s.teachers:
            need(
                lang in cfg.train_languages,
                f"strategy.teachers names '{lang}', which has no training branch (languages: {cfg.train_languages})",
            )
    need(s.teacher_data in ("branch", "mixmrc"), f"strategy.teacher_data must be branch or mixmrc, got '{s.teacher_data}'")
    need(s.translate_train in ("per_language", "union"), "strategy.translate_train must be per_language or union")
    _check_xsta(need, cfg)
    _check_skd(need, cfg)
    need(k.aggregation in ("imp", "hyper"), f"distill.aggregation must be imp or hyper, got '{k.aggregation}'")
    need(k.imp_sign in (-1.0, 1.0), f"distill.imp_sign must be -1 or +1, got {k.imp_sign}")
    if k.weights is not None:
        missing = [t for t in cfg.teacher_languages if t not in k.weights]
        need(not missing, f"distill.weights has no weight for teacher(s) {missing}")
        need(all(w >= 0 for w in k.weights.values()), "distill.weights must be non-negative")
        need(sum(k.weights[t] for t in cfg.teacher_languages) > 0,
             f"distill.weights of the teachers in use {cfg.teacher_languages} are all zero")
    need(k.tau > 0, f"distill.tau must be positive, got {k.tau}")
    # lambda_kd = 0 is a control: the student trains on NLL over D alone.
    need(k.lambda_nll >= 0 and k.lambda_kd >= 0 and k.lambda_nll + k.lambda_kd > 0,
         f"distill.lambda_nll and distill.lambda_kd must be >= 0, not both 0; got {k.lambda_nll} and {k.lambda_kd}")
    need(not k.placebo_shuffle or s.name == "lbmrc",
         f"distill.placebo_shuffle is a control of strategy lbmrc, not of '{s.name}'")
    need(cfg.phase1_from is None or s.name == "lbmrc" or (s.name == "skd" and s.skd.phase1),
         f"phase1_from borrows LBMRC's teachers or SKD's phase-1 model; strategy '{s.name}' has none to borrow")
    need(cfg.phase1_from is None or Path(cfg.phase1_from).resolve() != cfg.run_path.resolve(),
         f"phase1_from names this run's own directory ({cfg.phase1_from}); leave it null to train the models here")
    need(k.store_dir is None or s.name == "lbmrc",
         f"distill.store_dir shares LBMRC's teacher logits between runs; strategy '{s.name}' keeps its store in the run")
    need(k.store_dir is None or k.store_mode == "cache",
         f"distill.store_dir {k.store_dir} is shared: it needs distill.store_mode cache (window mode deletes shards "
         "another student may still read)")
    need(k.lookahead_shards >= 1, "distill.lookahead_shards must be at least 1")
    need(k.store_mode in ("window", "cache"), f"distill.store_mode must be window or cache, got '{k.store_mode}'")
    need(k.logits_dtype in ("float16", "bfloat16"), "distill.logits_dtype must be float16 or bfloat16")
    # (whether disk_budget_gb holds D is checked once the data is prepared: disk.check_precompute_budget)
    need(not k.precompute or k.store_mode == "cache",
         f"distill.precompute keeps every shard of D for every epoch: it needs distill.store_mode cache "
         f"(got '{k.store_mode}')")
    need(not k.precompute or s.name == "lbmrc",
         f"distill.precompute applies to strategy lbmrc's teacher logits, not to '{s.name}'")
    need(k.store_topk is None or k.store_topk >= 1,
         f"distill.store_topk must be null (dense) or at least 1, got {k.store_topk}")
    for role in ("teacher", "student"):
        t: TrainConfig = getattr(cfg, role)
        need(t.epochs >= 1, f"{role}.epochs must be at least 1")
        need(t.lr > 0, f"{role}.lr must be positive")
        need(0 <= t.warmup_ratio < 1, f"{role}.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        need(t.micro_batch_size >= 1 and t.grad_accum >= 1, f"{role}.micro_batch_size and grad_accum must be >= 1")
        need(t.global_batch_size is None or t.global_batch_size >= 1,
             f"{role}.global_batch_size must be null or at least 1, got {t.global_batch_size}")
        need(t.global_batch_size is None or t.grad_accum == 1,
             f"{role}.grad_accum is derived from {role}.global_batch_size: leave it at 1 (got {t.grad_accum}), "
             f"or set {role}.global_batch_size: null")
    need(0 <= cfg.model.doc_stride < cfg.model.max_length,
         "model.doc_stride must be at least 0 and smaller than model.max_length")
    need(cfg.checkpoint.every >= 1, f"checkpoint.every must be at least 1, got {cfg.checkpoint.every}")
    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be at least 1 (the resume point), got {cfg.checkpoint.keep}")
    need(cfg.run.stall_timeout_s > 0, f"run.stall_timeout_s must be positive, got {cfg.run.stall_timeout_s}")
    workers = cfg.run.loader_workers
    need(workers == "auto" or (isinstance(workers, int) and workers >= 0),
         f"run.loader_workers must be auto or a number of processes >= 0, got {workers!r}")
    need(cfg.run.num_proc == "auto" or (isinstance(cfg.run.num_proc, int) and cfg.run.num_proc >= 1),
         f"run.num_proc must be auto or a number of processes >= 1, got {cfg.run.num_proc!r}")
    need(cfg.monitor.every >= 1, f"monitor.every must be at least 1 (optimizer steps), got {cfg.monitor.every}")
    p = cfg.plan
    need(p.student_min_ranks >= 1, f"plan.student_min_ranks must be at least 1, got {p.student_min_ranks}")
    need(p.producers in ("auto", "dedicated", "shared"),
         f"plan.producers must be auto, dedicated or shared, got '{p.producers}'")
    need(p.producer_speed_ratio > 0, f"plan.producer_speed_ratio must be positive, got {p.producer_speed_ratio}")
    need(p.teacher_schedule in ("balanced", "sequential"),
         f"plan.teacher_schedule must be balanced or sequential, got '{p.teacher_schedule}'")
    need(p.teacher_schedule != "sequential" or p.producers != "dedicated",
         "plan.teacher_schedule sequential produces every teacher's logits on every rank: "
         "it needs plan.producers auto or shared, not dedicated")
