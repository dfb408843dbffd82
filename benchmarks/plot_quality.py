"""Figures of a quality table (benchmarks/quality.py's quality.json), per test set:

- heatmap_<set>.png: F1 over question language (rows) x passage language (columns), mean
  over seeds, for the best student (highest mean XLT F1), zero-shot and mixMRC side by side;
- bars_<set>.png: XLT and G-XLT F1 of every table line (row, model), mean over seeds with
  the sample std as error bars.

    python benchmarks/plot_quality.py benchmarks/results/quality_demo/quality.json [--out DIR]

Needs matplotlib (`pip install matplotlib`; it does not pull torch).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

BASELINES = (("zero_shot", "model_zero_shot", "zero-shot"), ("mixmrc", "model_mixmrc", "mixMRC"))


def pyplot():
    """matplotlib.pyplot, imported on first drawing: an optional dependency of the benchmarks
    only, so the rest of this module loads without it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot_quality: needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def mean_matrix(row: dict, model: str, set_name: str) -> tuple[list[str], np.ndarray] | None:
    """The F1 matrix of `model` in `row`, averaged over its seeds (a missing pair: NaN)."""
    mats, langs = [], None
    for rec in row["seeds"].values():
        section = rec["models"].get(model, {}).get("test_sets", {}).get(set_name)
        if section is None:
            continue
        langs = section["matrix"]["languages"]
        mats.append([[math.nan if v is None else v for v in r] for r in section["matrix"]["f1"]])
    return (langs, np.mean(np.array(mats, dtype=float), axis=0)) if mats else None


def best_student(rows: dict, set_name: str) -> tuple[str, str] | None:
    """(row, model) of the student line with the highest mean XLT F1 on `set_name`, among
    the methods' rows: a control's student (lambda_kd = 0, the placebo) is no method's, and a
    top-k store's is the method's with a storage option."""
    scored = [(stats[set_name]["xlt"]["f1"]["mean"], name, model) for name, row in rows.items()
              if row.get("group") not in ("control", "topk")
              for model, stats in row["mean_std"].items()
              if model.startswith("student") and "xlt" in stats.get(set_name, {})]
    return max(scored)[1:] if scored else None


def heatmap(rows: dict, set_name: str, path: Path) -> bool:
    panels = []
    best = best_student(rows, set_name)
    if best:
        panels.append((f"best student: {best[0]}" + (f" ({best[1]})" if best[1] != "student" else ""), *best))
    panels += [(title, row, model) for row, model, title in BASELINES if row in rows]
    mats = [(title, m) for title, row, model in panels if (m := mean_matrix(rows[row], model, set_name))]
    if not mats:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.8), squeeze=False)
    vmax = max(np.nanmax(m) for _, (_, m) in mats)
    for ax, (title, (langs, m)) in zip(axes[0], mats):
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(langs)), langs)
        ax.set_xlabel("passage language")
        ax.set_title(title, fontsize=9)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.1f}", ha="center", va="center",
                    color="white" if v < vmax * 0.6 else "black", fontsize=8)
    axes[0][0].set_ylabel("question language")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="F1 (mean over seeds)")
    fig.suptitle(f"F1 by question x passage language, test set '{set_name}'", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def bars(rows: dict, set_name: str, path: Path) -> bool:
    lines = [(name if len(row["mean_std"]) == 1 else f"{name}\n{model}", stats[set_name])
             for name, row in rows.items() for model, stats in row["mean_std"].items() if set_name in stats]
    if not lines:
        return False
    x = np.arange(len(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.62 * len(lines)), 4.2))
    for offset, key, label in ((-0.2, "xlt", "XLT F1"), (0.2, "g_xlt", "G-XLT F1")):
        cells = [s.get(key, {}).get("f1") for _, s in lines]
        means = [c["mean"] if c else math.nan for c in cells]
        errs = [c["std"] if c and c["std"] is not None else 0.0 for c in cells]
        ax.bar(x + offset, means, 0.4, yerr=errs, capsize=3, label=label)
    ax.set_xticks(x, [label for label, _ in lines], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("F1 (mean ± sample std over seeds)")
    ax.set_title(f"F1 by row, test set '{set_name}' (n seeds: {max(s['xlt']['f1']['n'] for _, s in lines if 'xlt' in s)} max)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("quality", type=Path, help="quality.json of benchmarks/quality.py")
    p.add_argument("--out", type=Path, help="folder for the PNG files (default: beside quality.json)")
    args = p.parse_args(argv)
    pyplot()  # says at once when matplotlib is missing
    rows = json.loads(args.quality.read_text())["rows"]
    out = args.out or args.quality.parent
    out.mkdir(parents=True, exist_ok=True)
    set_names = list(dict.fromkeys(s for row in rows.values() for stats in row["mean_std"].values() for s in stats))
    for set_name in set_names:
        for kind, draw in (("heatmap", heatmap), ("bars", bars)):
            path = out / f"{kind}_{set_name}.png"
            print(f"{path}" if draw(rows, set_name, path) else f"{path}: nothing to draw yet")


if __name__ == "__main__":
    main()
