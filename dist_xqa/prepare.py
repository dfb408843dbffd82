"""Data preparation for a run: training corpus -> parallel set -> article splits -> the
training set of every phase-1 job, the distillation set D and the dev sets (from the
training corpus's dev split or a separate dev corpus) -> features; and every test set
(`data.test`, or the training corpus's test split) -> gold questions and features.

Runs on one process before any training (rank 0 of the job, or `--stage prepare` as a
job of its own, on CPUs), tokenising with `run.num_proc` processes and calling its `beat`
as it goes (the heartbeat the other ranks wait on); everything lands under
`<run>/prepared/` and the other ranks read it from there. A run directory prepared with different training data or
model settings is refused: its teachers and logit store would not match. Test sets are
prepared apart (`prepared/test/<name>/`), each with its own fingerprint, so test sets
added to a finished run are prepared then and scored by `--stage evaluate`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dist_xqa import stages
from dist_xqa.config import ConfigError, EvalSetConfig, RunConfig
from dist_xqa.data import builders
from dist_xqa.data.demo import DEMO_NOISE, ensure_demo_corpus
from dist_xqa.data.features import TokenizerSettings, build_features, save_features
from dist_xqa.data.parallel import ParallelSet, load_parallel
from dist_xqa.data.records import DataError, QAExample
from dist_xqa.data.splits import proportional_split, split_parallel
from dist_xqa.data.testsets import EvalCorpus, eval_files, read_eval_corpus
from dist_xqa.data.tokenizer import ensure_tokenizer
from dist_xqa.disk import check_disk, check_precompute_budget
from dist_xqa.files import read_json, write_json
from dist_xqa.jobs import DISTILL_SET, STUDENT_SETS, dev_set, phase1_jobs
from dist_xqa.layout import RunLayout
from dist_xqa.models import load_tokenizer
from dist_xqa.prepared import EXAMPLES, FEATURES, GOLD, INFO, Prepared, run_test_sets, write_examples

log = logging.getLogger(__name__)

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
    if student_set := STUDENT_SETS.get(cfg.strategy.name):
        names += [student_set, dev_set(student_set)]
    return list(dict.fromkeys(names))  # "w/ mix" teachers share one set


def _load_corpus(folder: Path, pattern: str, languages: list[str], what: str) -> ParallelSet:
    """One parallel corpus; logs, per language, what the loader rejected or repaired and
    how many ids other languages have and it lacks (their pairs with it are left out)."""
    if not folder.is_dir():
        raise ConfigError(f"{what}.folder {folder} is not a directory")
    try:
        ps, reports = load_parallel(folder, languages, pattern=pattern)
    except FileNotFoundError as err:
        raise ConfigError(f"{what}: {err}") from None
    for lang, report in reports.items():
        log.info(report.summary())
        if report.kept == 0:
            raise ConfigError(f"{what}.languages: language '{lang}' has no usable examples in {folder}")
        lacking = ps.missing.get(lang, [])
        if lacking:
            rejected_ids = {i for ids in report.rejected.values() for i in ids}
            rejected = sum(1 for i in lacking if i in rejected_ids)
            log.warning("%s: language '%s' lacks %d of %d question ids (%d rejected by the loader, listed "
                        "above; %d absent from its file, e.g. %s); only the pairs with '%s' lose them",
                        what, lang, len(lacking), len(ps.ids), rejected, len(lacking) - rejected,
                        ", ".join(lacking[:3]), lang)
    return ps


def _train_corpus(cfg: RunConfig, run_dir: Path) -> tuple[ParallelSet, Path, str]:
    """The training corpus, its folder and file pattern (the demo's generated files for
    data.source demo)."""
    d = cfg.data
    if d.source == "demo":
        noise = DEMO_NOISE if d.demo_noise is None else d.demo_noise
        paths = ensure_demo_corpus(RunLayout(run_dir).demo_data, languages=tuple(d.train.languages), n_articles=d.demo_articles,
                                   seed=cfg.seed, noise=noise)
        folder, pattern = Path(next(iter(paths.values()))).parent, "demo.{lang}.json"
    else:
        folder, pattern = Path(d.train.folder), d.train.pattern
    return _load_corpus(folder, pattern, d.train.languages, "data.train"), folder, pattern


def _split_ranges(cfg: RunConfig, ps: ParallelSet) -> dict[str, range]:
    """Article ranges of the training corpus (see TrainCorpusConfig.split)."""
    if cfg.data.train.split is not None:
        return {name: range(*cfg.data.train.split.get(name, (0, 0))) for name in ("train", "dev", "test")}
    n_articles = 1 + max(ps.any_example(i).article_index for i in ps.ids)
    if not cfg.data.test:
        fractions = (0.7, 0.1, 0.2)
    elif cfg.data.dev is None:
        fractions = (0.9, 0.1, 0.0)
    else:
        fractions = (1.0, 0.0, 0.0)
    return proportional_split(n_articles, fractions)


def _dev_corpus(cfg: RunConfig) -> ParallelSet:
    dev = cfg.data.dev
    ps = _load_corpus(Path(dev.folder), dev.pattern, dev.languages, "data.dev")
    if dev.articles:
        keep = range(*dev.articles)
        ps = ps.subset([i for i in ps.ids if ps.any_example(i).article_index in keep])
    return ps


def check_test_files(cfg: RunConfig) -> None:
    """Every file of every `data.test` set exists once and is readable: checked before the
    training data is prepared, so a typo costs seconds, not a preparation."""
    for spec in cfg.data.test:
        try:
            eval_files(spec)
        except DataError as err:
            raise ConfigError(f"data.test: {err}") from None


def num_proc(cfg: RunConfig) -> int:
    """The processes that tokenise (run.num_proc; auto: the cores this process may use)."""
    return len(os.sched_getaffinity(0)) if cfg.run.num_proc == "auto" else cfg.run.num_proc


def prepare(cfg: RunConfig, beat: Callable[[], None] = lambda: None) -> Prepared:
    """Build everything phase 1 and 2 read and every test set, unless this run directory
    already has it. `beat` is called after every unit of work (a chunk tokenised, a set
    built)."""
    check_test_files(cfg)
    prepared = _prepare_training(cfg, beat)
    for spec in run_test_sets(cfg, prepared):
        _prepare_test_set(spec, prepared, num_proc(cfg), beat)
        beat()
    check_precompute_budget(cfg, prepared)
    if cfg.run.check_disk:  # before any training: a run that cannot fit its run_dir stops here
        check_disk(cfg, prepared)
    return prepared


def _prepare_training(cfg: RunConfig, beat: Callable[[], None]) -> Prepared:
    run_dir = cfg.run_path
    layout = RunLayout(run_dir)
    root = layout.prepared
    fingerprint = stages.fingerprint(cfg, stages.PREPARED_KEYS)
    info_path = layout.prepared_info
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["fingerprint"] != fingerprint:
            raise ConfigError(
                f"{run_dir} was prepared with different data/model/strategy settings; "
                f"use a new run_dir (or delete {root}) to change them")
        return Prepared(run_dir)

    ps, folder, pattern = _train_corpus(cfg, run_dir)
    beat()
    ranges = _split_ranges(cfg, ps)
    splits = split_parallel(ps, **ranges, drop_uncovered=cfg.data.train.split is not None)
    unused = len(ps.ids) - sum(len(v.ids) for v in splits.values())
    if unused:
        log.info("data.train: %d question ids are in articles outside data.train.split and not used", unused)
    train_ps = splits["train"]
    if cfg.data.dev is not None:
        dev_ps, dev_description = _dev_corpus(cfg), f"data.dev: {cfg.data.dev.folder}"
    else:
        dev_ps = splits["dev"]
        dev_description = f"data.train split.dev (articles {ranges['dev'].start}..{ranges['dev'].stop - 1})"

    if cfg.model.name == "tiny":
        # The tokenizer sees the training split only: test languages it never saw are the
        # zero-shot condition, as for a pretrained model's vocabulary.
        texts = [text for lang in train_ps.languages for ex in train_ps.examples[lang].values()
                 for text in (ex.question, ex.context)]
        tokenizer = ensure_tokenizer(layout.tokenizer, texts, vocab_size=cfg.model.tiny.get("vocab_size", 2000))
        tokenizer_name = "tiny"
    else:
        tokenizer = load_tokenizer(cfg.model.name)
        tokenizer_name = cfg.model.name
    tokenizer.save_pretrained(layout.tokenizer)
    settings = TokenizerSettings.from_tokenizer(tokenizer, tokenizer_name, cfg.model.max_length, cfg.model.doc_stride)

    table = _set_builders(cfg)
    for name in needed_sets(cfg):
        if name.endswith(".dev"):
            try:
                examples = table[name[:-4]](dev_ps)
            except ValueError as err:
                raise ConfigError(f"dev set '{name}' ({dev_description}): {err}") from None
        else:
            examples = table[name](train_ps)
            if cfg.data.max_train_examples:
                examples = examples[: cfg.data.max_train_examples]
        _save_set(layout.prepared_set(name), examples, tokenizer, settings, layout.feature_cache, num_proc(cfg), beat)
        beat()
        log.info("prepared set %-16s %6d examples", name, len(examples))

    test_articles = [ranges["test"].start, ranges["test"].stop] if len(ranges["test"]) else None
    info = {"fingerprint": fingerprint, "tokenizer_settings": asdict(settings),
            "languages": list(ps.languages), "train_languages": cfg.train_languages,
            "splits": {k: len(v.ids) for k, v in splits.items()}, "dev": dev_description,
            "split_test": {"folder": str(folder), "pattern": pattern, "articles": test_articles}}
    write_json(info_path, info)
    return Prepared(run_dir)


def _save_set(out: Path, examples: list[QAExample], tokenizer, settings: TokenizerSettings, cache: Path,
              processes: int, beat: Callable[[], None]) -> None:
    ds = build_features(examples, tokenizer, settings, cache_dir=cache, num_proc=processes, beat=beat)
    save_features(ds, settings, out)
    write_examples(out / EXAMPLES, examples)


def eval_set_fingerprint(spec: EvalSetConfig, settings: TokenizerSettings) -> str:
    relevant = {"spec": asdict(spec), "tokenizer": settings.fingerprint()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _prepare_test_set(spec: EvalSetConfig, prepared: Prepared, processes: int, beat: Callable[[], None]) -> None:
    """Gold questions and features of one test set, unless prepared with the same spec."""
    out = prepared.layout.prepared_test_set(spec.name)
    fingerprint = eval_set_fingerprint(spec, prepared.settings)
    info = read_json(out / INFO)
    if info is not None and info["fingerprint"] == fingerprint:
        return
    if info is not None:
        log.info("test set '%s' changed since it was prepared: preparing it again", spec.name)
    corpus: EvalCorpus = read_eval_corpus(spec)
    if not corpus.gold:
        raise ConfigError(f"data.test '{spec.name}': no question in {', '.join(corpus.files)}"
                          + (f" within articles {spec.articles}" if spec.articles else ""))
    if corpus.rejected:
        by_reason: dict[str, int] = {}
        for reason in corpus.rejected.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        log.warning("test set '%s': %d of %d questions cannot be answered and count as misses: %s", spec.name,
                    len(corpus.rejected), len(corpus.gold),
                    "; ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items())))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = prepared.tokenizer()
    ds = build_features(corpus.answerable, tokenizer, prepared.settings, cache_dir=prepared.layout.feature_cache,
                        num_proc=processes, beat=beat)
    save_features(ds, prepared.settings, out / FEATURES)
    write_examples(out / EXAMPLES, corpus.answerable)
    write_examples(out / GOLD, corpus.gold)
    write_json(out / INFO, {
        "fingerprint": fingerprint, "name": spec.name, "format": spec.format,
        "normalization": spec.normalization, "languages": list(spec.languages), "articles": spec.articles,
        "files": corpus.files, "questions": len(corpus.gold), "answerable": len(corpus.answerable),
        "rejected": {"|".join(key): reason for key, reason in corpus.rejected.items()},
    })
    log.info("prepared test set %-10s %6d questions (%d answerable) %6d features", spec.name,
             len(corpus.gold), len(corpus.answerable), len(ds))
