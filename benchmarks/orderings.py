"""Do the papers' orderings hold in a quality table? (benchmarks/quality.py's quality.json)

Each claim compares two table lines (row, model) on one column of the first test set: XLT
F1 (the mean over languages), or one language's F1 for "a teacher's removal costs its own
language". Over the seeds both lines have, it reports each line's mean ± sample std, the
per-seed difference (paired: the same seed is the same generated corpus on the demo) and a
verdict:

- `holds`: the mean difference is positive and larger than the seed spread (the larger of
  the two lines' sample std over seeds);
- `reversed`: negative and larger than the spread;
- `within spread`: smaller than the spread either way;
- `1 seed`: one seed cannot tell a difference from the noise (the difference is shown).

The verdict is a reading aid, not a test: with 3 seeds, "larger than the spread" is a
rough bar (it is what the issue asks: above the control "by more than the seed spread").
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    text: str
    better: tuple[str, str]  # (row, model) the papers put above
    worse: tuple[str, str]
    column: str = "xlt"  # xlt, or a language: its own F1 (question and passage in it)


LBMRC = ("lbmrc_imp", "student")
CLAIMS = (
    Claim("LBMRC > mixMRC", LBMRC, ("mixmrc", "model_mixmrc")),
    Claim("mixMRC > zero-shot", ("mixmrc", "model_mixmrc"), ("zero_shot", "model_zero_shot")),
    Claim("LBMRC > its student with lambda_kd = 0", LBMRC, ("lbmrc_kd0", "student")),
    Claim("LBMRC > placebo (shuffled teacher logits)", LBMRC, ("lbmrc_placebo", "student")),
    Claim("LBMRC > translate-train union", LBMRC, ("tt_union", "model_translate_train")),
    Claim("imp > hyper", LBMRC, ("lbmrc_hyper", "student")),
    Claim("imp s = -1 > s = +1", LBMRC, ("lbmrc_imp_s+1", "student")),
    Claim("the es teacher helps es", LBMRC, ("lbmrc_wo_es", "student"), "es"),
    Claim("the de teacher helps de", LBMRC, ("lbmrc_wo_de", "student"), "de"),
    Claim("K language teachers > English teacher only", LBMRC, ("lbmrc_w_en", "student")),
    Claim("language-branch teachers > K mixMRC teachers", LBMRC, ("lbmrc_w_mix", "student")),
    Claim("SKD mAP@k > fixed alpha", ("skd_map", "student"), ("skd_fixed", "student")),
    Claim("SKD mAP@k > w/ ce (no teacher)", ("skd_map", "student"), ("skd_w_ce", "student")),
    Claim("X-STA > translate-train union", ("xsta", "student"), ("tt_union", "model_translate_train")),
    Claim("X-STA: translate-test > p_T alone", ("xsta", "student"), ("xsta", "student_p_T_alone")),
)


def seed_scores(quality: dict, line: tuple[str, str], set_name: str, column: str) -> dict[str, float]:
    """F1 of one table line per seed (seeds where the line or the column is missing are left out)."""
    row, model = line
    scores = {}
    for seed, rec in quality["rows"].get(row, {}).get("seeds", {}).items():
        section = rec["models"].get(model, {}).get("test_sets", {}).get(set_name)
        if section is None:
            continue
        cell = section.get(column) if column in ("xlt", "g_xlt") else section["per_language"].get(column)
        if cell is not None:
            scores[seed] = cell["f1"]
    return scores


def judge(better: list[float], worse: list[float]) -> dict:
    """The comparison of two paired lists of scores (same seeds, same order)."""
    diffs = [b - w for b, w in zip(better, worse)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"diffs": diffs, "mean_diff": mean, "spread": None, "verdict": "1 seed"}
    spread = max(statistics.stdev(better), statistics.stdev(worse))
    verdict = "holds" if mean > spread else "reversed" if mean < -spread else "within spread"
    return {"diffs": diffs, "mean_diff": mean, "spread": spread, "verdict": verdict}


def orderings(quality: dict, set_name: str) -> list[dict]:
    """Every claim whose two lines share at least one seed on `set_name`."""
    out = []
    for claim in CLAIMS:
        better = seed_scores(quality, claim.better, set_name, claim.column)
        worse = seed_scores(quality, claim.worse, set_name, claim.column)
        seeds = sorted(set(better) & set(worse), key=int)
        if not seeds:
            continue
        b, w = [better[s] for s in seeds], [worse[s] for s in seeds]
        out.append({"claim": claim.text, "column": claim.column, "better": "/".join(claim.better),
                    "worse": "/".join(claim.worse), "seeds": seeds,
                    "better_mean": statistics.fmean(b), "worse_mean": statistics.fmean(w), **judge(b, w)})
    return out


def markdown(results: list[dict], set_name: str) -> str:
    if not results:
        return ""
    head = ["claim (the papers')", "F1 column", "better line", "worse line", "per-seed difference",
            "mean difference", "seed spread", "verdict"]
    lines = [f"Orderings on test set `{set_name}` (paired by seed; verdict: `holds` when the mean difference "
             f"exceeds the larger std over seeds of the two lines):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        spread = "-" if r["spread"] is None else f"{r['spread']:.1f}"
        lines.append("| " + " | ".join([
            r["claim"], "XLT" if r["column"] == "xlt" else r["column"],
            f"`{r['better']}` {r['better_mean']:.1f}", f"`{r['worse']}` {r['worse_mean']:.1f}",
            ", ".join(f"{d:+.1f}" for d in r["diffs"]), f"{r['mean_diff']:+.1f}", spread, r["verdict"]]) + " |")
    return "\n".join(lines)
