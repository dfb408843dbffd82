"""The evaluate stage: every trained model of the run (teachers, baselines, the student)
scored on the test split over every question x passage language pair.

Models are spread over the ranks (model i on rank i mod N), each written to
`<run>/eval/<model>.json` with its predictions; rank 0 then prints the per-language
table and writes `<run>/eval/summary.json`. No collective: ranks meet through files.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from dist_xqa.config import RunConfig
from dist_xqa.evaluate import postprocess, score
from dist_xqa.inference import predict_logits
from dist_xqa.models import load_trained
from dist_xqa.monitor import Monitor
from dist_xqa.prepare import TEST_SET, Prepared
from dist_xqa.logits.files import wait_for_files, write_json

log = logging.getLogger(__name__)


def model_name(model_dir: Path) -> str:
    """The name a model's results go under: teacher_<lang>, model_<baseline> or student."""
    parent = model_dir.parent.name
    return f"{parent[:-1]}_{model_dir.name}" if parent in ("teachers", "models") else model_dir.name


def evaluate_model(model_dir: Path, cfg: RunConfig, prepared: Prepared, device: torch.device) -> dict:
    features, examples = prepared.features(TEST_SET), prepared.examples(TEST_SET)
    model = load_trained(model_dir).to(device)
    start, end = predict_logits(model, features, cfg.eval.batch_size, device, desc=f"eval {model_dir.name}")
    preds = postprocess(features, start, end, examples, cfg.eval.n_best, cfg.eval.max_answer_length)
    report = score(examples, preds, cfg.data.normalization)
    report["model_dir"] = str(model_dir)
    report["selection"] = json.loads((model_dir / "DONE.json").read_text())
    report["split"] = "test"
    report["predictions"] = {"|".join(k): v for k, v in preds.items()}
    return report


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


def evaluate_all(cfg: RunConfig, prepared: Prepared, device: torch.device, model_dirs: list[Path],
                 timeout_s: float = 3600) -> None:
    """Scores `model_dirs` (model i on rank i mod N); a rank waits for a model of its own
    until its DONE.json is there, since other ranks may still be training it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    eval_dir = cfg.run_path / "eval"
    models = [(model_name(d), d) for d in model_dirs]
    for i, (name, model_dir) in enumerate(models):
        if i % world != rank:
            continue
        wait_for_files([model_dir / "DONE.json"], timeout_s, f"model {name} never finished")
        out = eval_dir / f"{name}.json"
        if not out.exists() or out.stat().st_mtime < (model_dir / "DONE.json").stat().st_mtime:
            write_json(out, evaluate_model(model_dir, cfg, prepared, device))
    if rank != 0:
        return
    wait_for_files([eval_dir / f"{name}.json" for name, _ in models], timeout_s, "evaluation results missing")
    reports = {name: json.loads((eval_dir / f"{name}.json").read_text()) for name, _ in models}
    monitor = Monitor(cfg.run_path, "eval", enabled=True)
    for name, rep in reports.items():
        for lang, s in rep["per_language"].items():
            monitor.scalars({f"eval/{name}/{lang}/f1": s["f1"], f"eval/{name}/{lang}/em": s["exact_match"]}, 0)
    monitor.close()
    summary = {name: {k: rep[k] for k in ("per_language", "xlt", "g_xlt", "pooled", "matrix", "selection")
                      if k in rep} for name, rep in reports.items()}
    write_json(eval_dir / "summary.json", summary)
    table = format_table(reports, prepared.info["languages"])
    (eval_dir / "table.txt").write_text(table + "\n")
    print(f"\nTest split, {cfg.data.normalization} normalisation, EM/F1 per language (question and passage "
          f"in that language), XLT and G-XLT averages:\n{table}\n", flush=True)
