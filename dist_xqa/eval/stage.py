"""The evaluate stage: every trained model of the run (teachers, baselines, the student)
scored on every test set of the run (`data.test`, or the training corpus's test split):
each set on every question of its files, as the official scripts score a prediction file,
normalised as the set says (squad: the same rules for every language; mlqa: by the
passage language, each MLQA file a pair of its own).

Models are spread over the ranks (model i on rank i mod N), each written to
`<run>/eval/<model>.json`: one section per test set (format, normalisation, languages,
per-pair matrix, XLT / G-XLT, the questions that could not be answered and why) and the
predictions. Rank 0 then prints one table per test set and writes `<run>/eval/summary.json`.
An X-STA student is scored with translate-test inference where its test set allows it, and
with p_T alone too (`score_xsta_test_set`). A model's results are redone when the model is
newer, a test set changed or was added, or X-STA's inference settings changed. Models
borrowed from another run (phase1_from) are listed as this run's, and take that run's
results when they are current for this run's test sets (they are scored here otherwise).
No collective: ranks meet through files.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from dist_xqa.config import EvalSetConfig, RunConfig
from dist_xqa.eval.decode import postprocess
from dist_xqa.eval.report import score
from dist_xqa.files import read_json, write_json
from dist_xqa.inference import predict_logits
from dist_xqa.jobs import borrowed, phase1_root
from dist_xqa.layout import EVAL, RunLayout
from dist_xqa.models import load_trained
from dist_xqa.monitor import Monitor
from dist_xqa.prepared import Prepared, PreparedTestSet, run_test_sets
from dist_xqa.strategies.xsta_model import XstaModule, is_xsta, load_xsta, translate_test_scores
from dist_xqa.waiting import (FINISHED, Heartbeat, StallWatch, role_heartbeat, role_heartbeats,
                              wait_for_run_files, wait_until)

log = logging.getLogger(__name__)
REPORT_KEYS = ("per_language", "xlt", "g_xlt", "pooled", "matrix")
# X-STA's sections add how they were scored and p_T alone (score_xsta_test_set)
SUMMARY_KEYS = REPORT_KEYS + ("normalization", "format", "inference", "p_T_alone")


def score_test_set(model, spec: EvalSetConfig, cfg: RunConfig, prepared: Prepared, device: torch.device,
                   desc: str) -> tuple[dict, dict]:
    """(section of the model's report, predictions) for one test set. Questions without
    features (the loader rejected them) have no prediction: `score` counts them as misses."""
    test = prepared.test_set(spec.name)
    features = test.features()
    start, end = predict_logits(model, features, cfg.eval.batch_size, device, desc=desc)
    return _scored(test, features, start, end, spec, cfg)


def _scored(test: PreparedTestSet, features, start, end, spec: EvalSetConfig, cfg: RunConfig) -> tuple[dict, dict]:
    """Span scores [N, L] of the test features decoded, scored and described."""
    preds = postprocess(features, start, end, test.examples(), cfg.eval.n_best, cfg.eval.max_answer_length)
    report = score(test.gold(), preds, spec.normalization)
    info = test.info
    trained = set(cfg.train_languages)
    report.update({
        "format": info["format"], "languages": info["languages"], "files": info["files"],
        "articles": info["articles"], "fingerprint": info["fingerprint"],
        "zero_shot_languages": [lang for lang in info["languages"] if lang not in trained],
        "questions": info["questions"], "unanswerable": info["rejected"],
    })
    return report, {"|".join(k): v for k, v in preds.items()}


def inference_settings(cfg: RunConfig) -> dict:
    """The run-config keys an X-STA model's scores depend on at evaluation: a result scored
    under other settings is redone."""
    x = cfg.strategy.xsta
    return {"translate_test": x.translate_test, "calibrate_at_inference": x.calibrate_at_inference}


def translate_test_source(spec: EvalSetConfig, info: dict, source_lang: str) -> tuple[str | None, str]:
    """(the file that gives a test set's examples their source-language version, or None;
    why not). A parallel set's own source-language file holds the same questions on the
    same passages: an oracle translation. An MLQA source-language file holds other
    passages (MLQA aligns sentences, not paragraphs): no translation of the others."""
    if spec.format != "parallel":
        return None, f"format {spec.format}: its {source_lang} files hold other passages, not translations"
    if source_lang not in info["languages"]:
        return None, f"the set has no {source_lang} file"
    return dict(zip(info["languages"], info["files"]))[source_lang], ""


def score_xsta_test_set(module: XstaModule, spec: EvalSetConfig, cfg: RunConfig, prepared: Prepared,
                        device: torch.device, desc: str) -> tuple[dict, dict]:
    """score_test_set for an X-STA model. Where `strategy.xsta.translate_test` is on and the
    set gives the examples' source-language versions, the section scores translate-test
    (`strategies.xsta_model.translate_test_scores`: p~_T = (p_T|S + p_T) / 2 for an example with its
    source version, p_T for one without) and keeps p_T alone under "p_T_alone"; otherwise
    it scores p_T alone. "inference" says which: the source file (an oracle translation),
    how many answerable examples were scored each way, and why the p_T ones were."""
    test = prepared.test_set(spec.name)
    features = test.features()
    start, end = predict_logits(module.encoder.qa, features, cfg.eval.batch_size, device, desc=desc)
    section, preds = _scored(test, features, start, end, spec, cfg)
    source_lang = module.x.source_lang or cfg.data.source_lang
    source_file, why_not = translate_test_source(spec, test.info, source_lang)
    paired: set = set()
    if not cfg.strategy.xsta.translate_test:
        why_not = "strategy.xsta.translate_test is false"
    elif source_file is not None:
        start, end, paired = translate_test_scores(module, features, source_lang, cfg.eval.batch_size, device)
        alone = {k: section[k] for k in REPORT_KEYS}
        section, preds = _scored(test, features, start, end, spec, cfg)
        section["p_T_alone"] = alone
        why_not = f"no {source_lang} version of the question in the set (id absent or rejected there)"
    answerable = [ex.key for ex in test.examples()]
    n_paired = sum(key in paired for key in answerable)
    section["inference"] = {
        "settings": inference_settings(cfg), "source_lang": source_lang,
        "translate_test_examples": n_paired, "p_T_examples": len(answerable) - n_paired,
        "translate_test_scores": ("p~_T = (p_T|S + p_T) / 2" if module.x.calibrate_at_inference
                                  else "p_T of the pair (calibration off at inference)"),
        # the source-language versions are the set's own file, not a machine translation
        "oracle_translation": source_file if n_paired else None,
        "p_T_because": why_not if n_paired < len(answerable) else None,
    }
    return section, preds


def evaluate_model(model_dir: Path, cfg: RunConfig, prepared: Prepared, device: torch.device,
                   heartbeat: Heartbeat) -> dict:
    sections, predictions = {}, {}
    if is_xsta(model_dir):
        module = load_xsta(model_dir).to(device)
        # inference-only settings come from the run config, so a rescoring can change them
        module.x = replace(module.x, calibrate_at_inference=cfg.strategy.xsta.calibrate_at_inference)
        scorer = functools.partial(score_xsta_test_set, module)
    else:
        scorer = functools.partial(score_test_set, load_trained(model_dir).to(device))
    for spec in run_test_sets(cfg, prepared):
        heartbeat.beat()
        sections[spec.name], predictions[spec.name] = scorer(
            spec, cfg, prepared, device, desc=f"eval {model_dir.name} on {spec.name}")
    return {"model_dir": str(model_dir), "selection": json.loads(RunLayout.done(model_dir).read_text()),
            "dev": prepared.info["dev"], "test_sets": sections, "predictions": predictions}


def _is_current(out: Path, model_dir: Path, fingerprints: dict[str, str], cfg: RunConfig) -> bool:
    """An existing result counts when it is newer than the model and holds every test set
    of the run, each prepared the same way (and, for X-STA, scored with the same
    inference settings)."""
    if not out.exists() or out.stat().st_mtime < RunLayout.done(model_dir).stat().st_mtime:
        return False
    settings = inference_settings(cfg) if is_xsta(model_dir) else None
    sections = (read_json(out) or {}).get("test_sets", {})
    return all(sections.get(name, {}).get("fingerprint") == fp
               and sections[name].get("inference", {}).get("settings") == settings
               for name, fp in fingerprints.items())


def format_table(reports: dict[str, dict], languages: list[str]) -> str:
    head = f"{'model':<22}" + "".join(f"{lang:>13}" for lang in languages) + f"{'XLT':>13}{'G-XLT':>13}"
    lines = [head, f"{'':<22}" + "        EM/F1" * (len(languages) + 2)]
    for name, rep in reports.items():
        cells = []
        for lang in languages:
            s = rep["per_language"].get(lang)
            cells.append(f"{s['exact_match']:5.1f}/{s['f1']:5.1f}" if s else "    -/-    ")
        for agg in ("xlt", "g_xlt"):
            s = rep.get(agg)
            cells.append(f"{s['exact_match']:5.1f}/{s['f1']:5.1f}" if s else "    -/-    ")
        lines.append(f"{name:<22}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def evaluate_all(cfg: RunConfig, prepared: Prepared, device: torch.device, model_dirs: list[Path]) -> None:
    """Scores `model_dirs` (model i on rank i mod N). A rank waits for a model of its own
    until its DONE.json is there, as long as the run's training roles beat (other ranks
    may still be training it); rank 0 waits for the other ranks' results as long as their
    evaluation beats."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = RunLayout(cfg.run_path)
    stall_s = cfg.run.stall_timeout_s
    specs = run_test_sets(cfg, prepared)
    fingerprints = {spec.name: prepared.test_set(spec.name).info["fingerprint"] for spec in specs}
    models = [(layout.model_name(d), d) for d in model_dirs]
    heartbeat = Heartbeat(role_heartbeat(cfg.run_path, EVAL, rank), EVAL)
    with heartbeat.guard():
        for i, (name, model_dir) in enumerate(models):
            if i % world != rank:
                continue
            wait_for_run_files(cfg.run_path, [layout.done(model_dir)], stall_s, f"evaluation waiting for model {name}")
            heartbeat.beat(i)
            out = layout.eval_result(name)
            if borrowed(cfg, model_dir) and not _is_current(out, model_dir, fingerprints, cfg):
                # Another run's model (phase1_from): its scores there serve when they are current.
                theirs = RunLayout(phase1_root(cfg)).eval_result(name)
                if _is_current(theirs, model_dir, fingerprints, cfg):
                    write_json(out, read_json(theirs))
            if not _is_current(out, model_dir, fingerprints, cfg):
                write_json(out, evaluate_model(model_dir, cfg, prepared, device, heartbeat))
        heartbeat.beat(len(models), state=FINISHED)
    if rank != 0:
        return
    outs = [layout.eval_result(name) for name, _ in models]
    # Results another rank is still writing (or rewriting, a test set was added).
    watch = StallWatch(lambda: role_heartbeats(cfg.run_path, EVAL), stall_s, "evaluation waiting for results")
    stale = lambda: [str(out) for out, (_, d) in zip(outs, models) if not _is_current(out, d, fingerprints, cfg)]  # noqa: E731
    wait_until(lambda: not stale(), watch, lambda: f" (not current: {stale()})")
    reports = {name: json.loads(layout.eval_result(name).read_text()) for name, _ in models}
    monitor = Monitor(cfg.run_path, EVAL, enabled=True)
    for name, rep in reports.items():
        for set_name, section in rep["test_sets"].items():
            for lang, s in section["per_language"].items():
                monitor.scalars({f"eval/{name}/{set_name}/{lang}/f1": s["f1"],
                                 f"eval/{name}/{set_name}/{lang}/em": s["exact_match"]}, 0)
    monitor.close()
    summary = {name: {"selection": rep["selection"], "dev": rep["dev"],
                      "test_sets": {set_name: {k: section[k] for k in SUMMARY_KEYS if k in section}
                                    for set_name, section in rep["test_sets"].items()}}
               for name, rep in reports.items()}
    write_json(layout.eval_summary, summary)
    text = "\n\n".join(_set_table(spec, reports) for spec in specs)
    layout.eval_table.write_text(text + "\n")
    print(f"\nModels selected on {prepared.info['dev']}.\n\n{text}\n", flush=True)


def _set_table(spec: EvalSetConfig, reports: dict[str, dict]) -> str:
    first = next(iter(reports.values()))["test_sets"][spec.name]
    zero_shot = first["zero_shot_languages"]
    pairs = "each MLQA file (context x question language) on its own" if spec.format == "mlqa" \
        else "every question x passage language pair"
    title = (f"Test set '{spec.name}' ({spec.format}: {pairs}; {spec.normalization} normalisation; "
             f"{first['questions']} questions, {len(first['unanswerable'])} unanswerable counted as misses"
             + (f"; zero-shot: {', '.join(zero_shot)}" if zero_shot else "") + ")")
    sections, notes = {}, []
    for name, rep in reports.items():
        section = sections[name] = rep["test_sets"][spec.name]
        if "p_T_alone" in section:
            sections[f"{name} (p_T alone)"] = section["p_T_alone"]
        if "inference" in section:
            notes.append(_inference_note(name, section["inference"]))
    return f"{title}\nEM/F1 per language (question and passage in it), XLT and G-XLT averages over pairs:\n" \
        + format_table(sections, list(spec.languages)) + "".join(f"\n{note}" for note in notes)


def _inference_note(name: str, inference: dict) -> str:
    """How an X-STA model's row was scored, for the table."""
    n, rest = inference["translate_test_examples"], inference["p_T_examples"]
    parts = []
    if n:
        parts.append(f"translate-test ({inference['translate_test_scores']}) on {n} examples, their "
                     f"{inference['source_lang']} version from {inference['oracle_translation']} "
                     "(an oracle translation)")
    if rest:
        parts.append(f"p_T alone on {rest} ({inference['p_T_because']})")
    return f"{name}: " + "; ".join(parts)
