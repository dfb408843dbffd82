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

STRATEGIES = ("lbmrc", "zero_shot", "translate_train", "mixmrc")


class ConfigError(ValueError):
    """A configuration problem; the message names the key (or file) to fix."""


@dataclass
class DataConfig:
    source: str = "demo"  # "demo" (generated into the run directory) or "squad" (files in `folder`)
    folder: str | None = None  # one SQuAD v1.1 file per language, matched by `pattern`
    pattern: str = "*.{lang}.json"
    languages: list[str] = field(default_factory=lambda: ["en", "es", "de"])
    source_lang: str = "en"  # the language the others were translated from
    # Languages only evaluated, never trained on (zero-shot condition), e.g. [ar, hi, vi].
    eval_only_languages: list[str] = field(default_factory=list)
    # Article index ranges [start, stop) per split; null = 70/10/20 by article.
    split: dict[str, list[int]] | None = None
    normalization: str = "squad"  # squad | mlqa (how EM/F1 normalise answers)
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
    micro_batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.005


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
    logits_dtype: str = "float16"  # float16 | bfloat16
    wait_timeout_s: float = 900.0


@dataclass
class StrategyConfig:
    name: str = "lbmrc"
    # lbmrc: the teachers to distil from (default: every training language); a subset
    # leaves the distillation set D unchanged and renormalises fixed weights.
    teachers: list[str] | None = None
    teacher_data: str = "branch"  # branch | mixmrc ("w/ mix": mixMRC-trained teachers)
    add_english: bool = True  # add the English branch to every non-English branch
    translate_train: str = "union"  # per_language (one model each) | union


@dataclass
class EvalConfig:
    n_best: int = 20
    max_answer_length: int = 30
    batch_size: int = 64
    select_on_dev: bool = True  # keep the epoch with the best dev F1


@dataclass
class RunConfig:
    name: str = "demo"
    run_dir: str | None = None  # default runs/<name> under the working directory
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between DeepSpeed checkpoints
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
        return [lang for lang in self.data.languages if lang not in self.data.eval_only_languages]

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
        return _coerce(value, inner[0], key)
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
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


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


def validate(cfg: RunConfig) -> None:
    """Cross-field checks a user can act on. Data-dependent checks (a language with no
    file) happen when the data is opened, still before any rank trains."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    d, s, k = cfg.data, cfg.strategy, cfg.distill
    need(d.source in ("demo", "squad"), f"data.source must be 'demo' or 'squad', got '{d.source}'")
    need(d.source != "squad" or bool(d.folder), "data.folder is required when data.source is 'squad'")
    need(len(set(d.languages)) == len(d.languages), f"data.languages has duplicates: {d.languages}")
    need(d.source_lang in d.languages, f"data.source_lang '{d.source_lang}' is not in data.languages {d.languages}")
    for lang in d.eval_only_languages:
        need(lang in d.languages, f"data.eval_only_languages: '{lang}' is not in data.languages {d.languages}")
    need(d.source_lang in cfg.train_languages, "data.source_lang cannot be an eval-only language")
    need(d.normalization in ("squad", "mlqa"), f"data.normalization must be squad or mlqa, got '{d.normalization}'")
    if d.split is not None:
        need(set(d.split) == {"train", "dev", "test"}, f"data.split needs exactly train, dev and test, got {sorted(d.split)}")
        for name, rng in d.split.items():
            need(len(rng) == 2 and 0 <= rng[0] <= rng[1], f"data.split.{name} must be [start, stop), got {rng}")
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
    need(k.aggregation in ("imp", "hyper"), f"distill.aggregation must be imp or hyper, got '{k.aggregation}'")
    need(k.imp_sign in (-1.0, 1.0), f"distill.imp_sign must be -1 or +1, got {k.imp_sign}")
    if k.weights is not None:
        missing = [t for t in cfg.teacher_languages if t not in k.weights]
        need(not missing, f"distill.weights has no weight for teacher(s) {missing}")
        need(all(w >= 0 for w in k.weights.values()), "distill.weights must be non-negative")
    need(k.tau > 0, f"distill.tau must be positive, got {k.tau}")
    need(k.lookahead_shards >= 1, "distill.lookahead_shards must be at least 1")
    need(k.store_mode in ("window", "cache"), f"distill.store_mode must be window or cache, got '{k.store_mode}'")
    need(k.logits_dtype in ("float16", "bfloat16"), "distill.logits_dtype must be float16 or bfloat16")
    for role in ("teacher", "student"):
        t: TrainConfig = getattr(cfg, role)
        need(t.epochs >= 1, f"{role}.epochs must be at least 1")
        need(t.lr > 0, f"{role}.lr must be positive")
        need(t.micro_batch_size >= 1 and t.grad_accum >= 1, f"{role}.micro_batch_size and grad_accum must be >= 1")
    need(0 <= cfg.model.doc_stride < cfg.model.max_length,
         "model.doc_stride must be at least 0 and smaller than model.max_length")
    need(cfg.checkpoint_every >= 1, "checkpoint_every must be at least 1")
