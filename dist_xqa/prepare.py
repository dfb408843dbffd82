"""Data preparation for a run: corpus -> aligned parallel set -> article splits -> the
training set of every phase-1 job, the distillation set D, dev and test sets -> features.

Runs once, on one rank, before any training; everything lands under `<run>/prepared/`
and the other ranks read it from there. A run directory prepared with different data or
model settings is refused: its teachers and logit store would not match.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_xqa.config import ConfigError, RunConfig
from dist_xqa.data import builders
from dist_xqa.data.demo import DEMO_NOISE, ensure_demo_corpus
from dist_xqa.data.features import TokenizerSettings, build_features, load_features, save_features
from dist_xqa.data.parallel import ParallelSet, load_parallel
from dist_xqa.data.records import Answer, QAExample
from dist_xqa.data.splits import XQUAD_SPLIT, proportional_split, split_parallel
from dist_xqa.data.tokenizer import ensure_tokenizer
from dist_xqa.models import load_tokenizer

log = logging.getLogger(__name__)

DISTILL_SET = "distill"
TEST_SET = "test"


@dataclass(frozen=True)
class Job:
    """One model trained with NLL in phase 1: a branch teacher or a baseline model."""

    name: str  # teacher language, or the baseline's name
    train_set: str  # prepared set names
    dev_set: str


def phase1_jobs(cfg: RunConfig) -> list[Job]:
    """The models phase 1 trains, by strategy:
    - lbmrc: one teacher per teacher language on its language branch D_k (or, with
      `strategy.teacher_data: mixmrc`, one teacher "mix" on the mixMRC set: "w/ mix");
    - zero_shot: one model on the source language; mixmrc: one model on every pair;
    - translate_train: one model per language (per_language) or one on the union."""
    s = cfg.strategy
    if s.name == "lbmrc" and s.teacher_data == "branch":
        return [Job(lang, f"branch_{lang}", f"branch_{lang}.dev") for lang in cfg.teacher_languages]
    if s.name == "lbmrc":
        return [Job("mix", "mixmrc", "mixmrc.dev")]
    if s.name == "translate_train" and s.translate_train == "per_language":
        return [Job(f"translate_train_{lang}", f"tt_{lang}", f"tt_{lang}.dev") for lang in cfg.train_languages]
    name = {"zero_shot": "zero_shot", "mixmrc": "mixmrc", "translate_train": "translate_train"}[s.name]
    set_name = {"zero_shot": "zero_shot", "mixmrc": "mixmrc", "translate_train": "tt_union"}[s.name]
    return [Job(name, set_name, f"{set_name}.dev")]


def _set_builders(cfg: RunConfig) -> dict[str, callable]:
    """Prepared set name -> builder over a ParallelSet of training languages."""
    s, langs = cfg.strategy, cfg.train_languages
    table = {
        "mixmrc": lambda ps: builders.mixmrc(ps),
        "zero_shot": lambda ps: builders.zero_shot(ps, source_lang=cfg.data.source_lang),
        "tt_union": lambda ps: builders.translate_train_union(ps),
        # D is built from every training branch, whichever teachers are distilled from.
        DISTILL_SET: lambda ps: builders.distillation_set(ps, branches=langs, add_english=s.add_english),
    }
    for lang in langs:
        table[f"branch_{lang}"] = lambda ps, lang=lang: builders.language_branch(
            ps, lang, add_english=s.add_english, source_lang=cfg.data.source_lang)
        table[f"tt_{lang}"] = lambda ps, lang=lang: builders.translate_train(ps, lang)
    return table


def needed_sets(cfg: RunConfig) -> list[str]:
    names = []
    for job in phase1_jobs(cfg):
        names += [job.train_set, job.dev_set]
    if cfg.strategy.name == "lbmrc":
        names += [DISTILL_SET, f"{DISTILL_SET}.dev"]
    return names + [TEST_SET]


def _fingerprint(cfg: RunConfig) -> str:
    relevant = {"data": asdict(cfg.data), "model": asdict(cfg.model), "strategy": asdict(cfg.strategy),
                "seed": cfg.seed}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class Prepared:
    """Read access to a prepared run directory (every rank)."""

    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / "prepared"
        self.info = json.loads((self.root / "prepared.json").read_text())
        self.tokenizer_dir = self.root / "tokenizer"

    @property
    def settings(self) -> TokenizerSettings:
        return TokenizerSettings(**self.info["tokenizer_settings"])

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    def features(self, name: str):
        ds, settings = load_features(self.root / "sets" / name)
        settings.check_same(self.settings, f"features of '{name}'", "this run's tokenizer settings")
        return ds

    def examples(self, name: str) -> list[QAExample]:
        lines = (self.root / "sets" / name / "examples.jsonl").read_text().splitlines()
        return [_example_from_json(json.loads(line)) for line in lines]


def _example_to_json(ex: QAExample) -> dict:
    return {**asdict(ex), "answers": [asdict(a) for a in ex.answers]}


def _example_from_json(obj: dict) -> QAExample:
    return QAExample(**{**obj, "answers": tuple(Answer(**a) for a in obj["answers"])})


def _load_corpus(cfg: RunConfig, run_dir: Path) -> tuple[ParallelSet, Path]:
    d = cfg.data
    if d.source == "demo":
        noise = DEMO_NOISE if d.demo_noise is None else d.demo_noise
        paths = ensure_demo_corpus(run_dir, languages=tuple(d.languages), n_articles=d.demo_articles,
                                   seed=cfg.seed, noise=noise)
        folder, pattern = Path(next(iter(paths.values()))).parent, "demo.{lang}.json"
    else:
        folder, pattern = Path(d.folder), d.pattern
        if not folder.is_dir():
            raise ConfigError(f"data.folder {folder} is not a directory")
    ps, reports = load_parallel(folder, d.languages, pattern=pattern)
    for lang, report in reports.items():
        log.info(report.summary())
        if report.kept == 0:
            raise ConfigError(f"data.languages: language '{lang}' has no usable examples in {folder}")
    if ps.missing and any(ps.missing.values()):
        for lang, ids in ps.missing.items():
            if ids:
                log.warning("%d question ids are missing in '%s' and left out of every set (e.g. %s)",
                            len(ids), lang, ", ".join(ids[:3]))
    return ps, folder


def _splits(cfg: RunConfig, ps: ParallelSet) -> dict[str, ParallelSet]:
    if cfg.data.split is not None:
        ranges = {k: range(*v) for k, v in cfg.data.split.items()}
    else:
        n_articles = 1 + max(ex.article_index for ex in ps.examples[ps.languages[0]].values())
        ranges = proportional_split(n_articles)
    return split_parallel(ps, **ranges)


def prepare(cfg: RunConfig) -> Prepared:
    """Build everything phase 1 and 2 read, unless this run directory already has it."""
    run_dir = cfg.run_path
    root = run_dir / "prepared"
    fingerprint = _fingerprint(cfg)
    info_path = root / "prepared.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["fingerprint"] != fingerprint:
            raise ConfigError(
                f"{run_dir} was prepared with different data/model/strategy settings; "
                f"use a new run_dir (or delete {root}) to change them")
        return Prepared(run_dir)

    ps, _ = _load_corpus(cfg, run_dir)
    splits = _splits(cfg, ps)
    train_ps = splits["train"].restrict(cfg.train_languages)
    dev_ps = splits["dev"].restrict(cfg.train_languages)

    if cfg.model.name == "tiny":
        texts = [text for lang in ps.languages for ex in ps.examples[lang].values() for text in (ex.question, ex.context)]
        tokenizer = ensure_tokenizer(root, texts, vocab_size=cfg.model.tiny.get("vocab_size", 2000))
        tokenizer_name = "tiny"
    else:
        tokenizer = load_tokenizer(cfg.model.name)
        tokenizer_name = cfg.model.name
    tokenizer.save_pretrained(root / "tokenizer")
    settings = TokenizerSettings.from_tokenizer(tokenizer, tokenizer_name, cfg.model.max_length, cfg.model.doc_stride)

    table = _set_builders(cfg)
    for name in needed_sets(cfg):
        if name == TEST_SET:
            examples = builders.mixmrc(splits["test"])  # every question x passage pair, every language
        elif name.endswith(".dev"):
            examples = table[name[:-4]](dev_ps)
        else:
            examples = table[name](train_ps)
            if cfg.data.max_train_examples:
                examples = examples[: cfg.data.max_train_examples]
        out = root / "sets" / name
        ds = build_features(examples, tokenizer, settings, cache_dir=root / "cache")
        save_features(ds, settings, out)
        (out / "examples.jsonl").write_text("".join(json.dumps(_example_to_json(e)) + "\n" for e in examples))
        log.info("prepared set %-16s %6d examples %6d features", name, len(examples), len(ds))

    info = {"fingerprint": fingerprint, "tokenizer_settings": asdict(settings),
            "languages": list(ps.languages), "train_languages": cfg.train_languages,
            "splits": {k: len(v.ids) for k, v in splits.items()}}
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(info_path)
    return Prepared(run_dir)
